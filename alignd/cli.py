"""The ``alignd`` command line.

    alignd serve [--host H] [--port P] [--model M] [...]   serve the model over HTTP
    alignd prepare-model [--model M]                       convert / locate the model, then exit
    alignd train dpo --out DIR [--reward R] [...]          a baseline aligned to a reward (LoRA adapter)
    alignd train irft --out DIR [--rounds T] [...]         a reward learned from demonstrations (LoRA adapter)
    alignd train value-head --out DIR [--states N] [...]   a value head: Q of the baseline's rollouts, distilled
    alignd select s2l --data FILE --budget B --out DIR     S2L data selection (loss trajectories of a proxy)
    alignd select random --data FILE --budget B --out DIR  a uniform random subset of the same size

Every setting is a flag (``--max-model-len 4096``) and an environment variable
(``ALIGND_MAX_MODEL_LEN=4096``); flags win. JSON-valued settings take JSON on the command line too
(``--rewards '{"mine": {"type": "callable", "path": "pkg.mod:fn"}}'``). ``alignd train`` is described in
docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from alignd.settings import Settings

# Exit status of `alignd train` on bad input (argparse's own for a bad command line).
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _add_settings_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, skip: frozenset[str] = frozenset()
) -> None:
    for name, field in Settings.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("%", "%%")
        # Values stay strings here; the settings model parses and validates them (same as env vars).
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def _takes_text(annotation) -> bool:
    """Whether a settings field holds text (str or a path), so a flag's value is taken as it is."""
    if annotation in (str, Path):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_text(a) for a in typing.get_args(annotation))
    return False


def _flag_value(name: str, raw: str):
    """A flag's string as the settings model should see it: decoded as JSON for non-text fields (a
    dict like --rewards, a number of a Literal like --max-lora-rank 32), as environment variables are;
    the raw string when it is not JSON (pydantic then parses it, e.g. 'True' or 'vllm')."""
    if _takes_text(Settings.model_fields[name].annotation):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        name: _flag_value(name, value)
        for name in Settings.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    return Settings(**overrides)


def _settings_errors(exc: ValidationError) -> list[str]:
    return [f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()]


def load_settings(args: argparse.Namespace) -> Settings:
    try:
        return _settings_from_args(args)
    except ValidationError as exc:
        sys.exit("alignd: invalid settings:\n" + "\n".join("  " + line for line in _settings_errors(exc)))


def _serve(settings: Settings) -> None:
    import uvicorn

    from alignd.server.app import create_app

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=10)


def _prepare(settings: Settings) -> None:
    from alignd.errors import AligndError
    from alignd.models.loading import resolve_model_path

    try:
        print(resolve_model_path(settings))
    except AligndError as exc:
        sys.exit(f"alignd: {exc.message}")


# ---------------------------------------------------------------------------- alignd train
def _default_data_file(name: str) -> Path:
    import alignd.train

    return Path(alignd.train.__file__).resolve().parent / "data" / name


def _modules(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _add_output_options(parser: argparse.ArgumentParser, artefact: str) -> None:
    out = parser.add_argument_group("output and resumption")
    out.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help=f"the {artefact} folder to write; work in progress is kept in DIR.partial/ and resumed by "
        "the same command",
    )
    out.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it exists (only once the new one is done)"
    )
    out.add_argument(
        "--restart", action="store_true", help="discard earlier work in DIR.partial/ instead of resuming it"
    )


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    from alignd.train.tuning import DEFAULT_TARGET_MODULES, MAX_LORA_RANK, TrainingOptions

    d = TrainingOptions()
    _add_output_options(parser, "adapter")
    dpo = parser.add_argument_group("training (TRL DPOConfig / PEFT LoraConfig)")
    dpo.add_argument("--beta", type=float, default=d.beta, help="DPO beta: KL strength to the SFT model (%(default)s)")
    dpo.add_argument(
        "--lora-rank",
        type=int,
        default=d.lora_rank,
        help=f"LoRA rank, at most ALIGND_MAX_LORA_RANK (else {MAX_LORA_RANK}) (%(default)s)",
    )
    dpo.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: twice the rank)")
    dpo.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout (%(default)s)")
    dpo.add_argument(
        "--target-modules",
        type=_modules,
        default=DEFAULT_TARGET_MODULES,
        metavar="A,B,...",
        help=f"layers that get an adapter ({','.join(DEFAULT_TARGET_MODULES)})",
    )
    dpo.add_argument("--epochs", type=float, default=d.epochs, help="passes over the pairs (%(default)s)")
    dpo.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps; > 0 overrides --epochs")
    dpo.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW learning rate (%(default)s)")
    dpo.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per device step (%(default)s)")
    dpo.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    dpo.add_argument("--save-steps", type=int, default=d.save_steps, help="TRL checkpoint every N steps (%(default)s)")
    dpo.add_argument("--logging-steps", type=int, default=d.logging_steps, help="TRL log every N steps (%(default)s)")
    dpo.add_argument(
        "--max-length", type=int, default=d.max_length, help="longest prompt + answer, tokens (%(default)s)"
    )
    dpo.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (large models)")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.25,0.5,1, got {text!r}") from None


def _value_head_parser(verbs) -> argparse.ArgumentParser:
    from alignd.train.value_head import DEFAULT_EVAL_PROMPTS, TARGET_KINDS, HeadTrainingOptions, TargetOptions

    t, h = TargetOptions(), HeadTrainingOptions()
    parser = verbs.add_parser(
        "value-head",
        help="a value head: Q^BL(s, z) of the baseline's rollouts distilled into a small head on the "
        "SFT model's hidden state",
        description="Sample SFT answers to --prompts, cut them into states, compute the SFT model's top-k "
        "candidates at each and their rollout values Q^BL(s, z) with transfer_q's own estimator (baseline "
        "--baseline, reward --reward), then train a value head on the SFT model's final hidden state and the "
        "candidates' embeddings. Interrupt at any time; the same command resumes.",
    )
    data = parser.add_argument_group("states and targets")
    data.add_argument(
        "--prompts",
        type=Path,
        default=_default_data_file("prompts.jsonl"),
        metavar="FILE",
        help='JSONL of {"id", "prompt"} lines (default: train/data/prompts.jsonl)',
    )
    data.add_argument(
        "--eval-prompts",
        type=Path,
        default=DEFAULT_EVAL_PROMPTS,
        metavar="FILE",
        help="evaluation prompts the training pool must not share a prompt with (default: eval/prompts.jsonl)",
    )
    data.add_argument(
        "--reward",
        default=None,
        metavar="NAME",
        help="the target reward, any reward of the registry (default: ALIGND_TARGET_REWARD)",
    )
    data.add_argument(
        "--baseline",
        default="default",
        metavar="NAME",
        help="whose rollouts give Q: 'default' (the server's default baseline: the committed DPO "
        "adapter on the embedded model), 'prompted', a name of ALIGND_BASELINES, or an adapter or "
        "model folder (%(default)s)",
    )
    data.add_argument(
        "--targets",
        choices=TARGET_KINDS,
        default=t.kind,
        help="what the head learns: 'rollouts', Q^BL from the baseline's rollouts scored by --reward "
        "(any baseline, any reward), or 'implicit', the exact token-level Q of a baseline trained by "
        "'alignd train dpo|irft' from this model, beta * (log pi_BL - log pi_SFT), at every position of "
        "sampled answers from one teacher-forced pass of each model (its own reward only) (%(default)s)",
    )
    data.add_argument(
        "--states",
        type=int,
        default=None,
        help=f"states s to make (rollouts: {t.states}; implicit: every state of the --answers)",
    )
    data.add_argument(
        "--answers",
        type=int,
        default=None,
        help="implicit targets: SFT answers to sample, each giving a state at every position "
        "(default: one per training prompt)",
    )
    data.add_argument("--top-k", type=int, default=t.top_k, help="candidates per state (%(default)s)")
    data.add_argument("--rollout-len", type=int, default=t.rollout_len, help="tokens per rollout (%(default)s)")
    data.add_argument(
        "--num-rollouts",
        type=int,
        default=t.num_rollouts,
        help="rollouts per candidate; 1 = greedy, more = sampled at temperature 1 (%(default)s)",
    )
    data.add_argument(
        "--answer-len",
        type=int,
        default=t.answer_len,
        help="longest sampled SFT answer that states are cut from (%(default)s)",
    )
    data.add_argument(
        "--sample-temperature",
        type=float,
        default=t.sample_temperature,
        help="temperature of the sampled answers (%(default)s)",
    )
    data.add_argument(
        "--concurrency",
        type=int,
        default=t.concurrency,
        help="states in flight at once; their engine calls batch together (%(default)s)",
    )
    data.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="make only the states of slots K modulo N, then stop: N such processes make the states "
        "together (one per core, VLLM_CPU_OMP_THREADS_BIND=K on the CPU backend); the same command "
        "without --shard then merges them and trains",
    )
    fit = parser.add_argument_group("training the head (Adam)")
    fit.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="the alpha of the top-1 agreement metric, recorded in the manifest (default: ALIGND_DECODING_ALPHA)",
    )
    fit.add_argument("--rank", type=int, default=h.rank, help="the head's width (%(default)s)")
    fit.add_argument("--epochs", type=float, default=h.epochs, help="passes over the training states (%(default)s)")
    fit.add_argument("--learning-rate", type=float, default=h.learning_rate, help="Adam's learning rate (%(default)s)")
    fit.add_argument("--batch-size", type=int, default=h.batch_size, help="states per step (%(default)s)")
    fit.add_argument(
        "--ranking-weight",
        type=float,
        default=h.ranking_weight,
        help="weight of the pairwise ranking term of the loss (%(default)s)",
    )
    fit.add_argument(
        "--holdout-fraction",
        type=float,
        default=h.holdout_fraction,
        help="fraction of the prompts whose states are held out (%(default)s)",
    )
    fit.add_argument(
        "--curve-fractions",
        type=_fractions,
        default=h.curve_fractions,
        metavar="F,F,F",
        help="data sizes of the learning curve, fractions of the training states, 1 among them (0.25,0.5,1)",
    )
    _add_output_options(parser, "value head")
    return parser


def _value_head_states(args: argparse.Namespace) -> int | None:
    from alignd.train.value_head import TargetOptions

    if args.states is not None or args.targets == "implicit":
        return args.states
    return TargetOptions().states


def _train_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    train = sub.add_parser(
        "train",
        help="train a baseline or a learned reward as a LoRA adapter, or a value head (docs/TRAINING.md)",
        description="Train a LoRA adapter of the served (SFT) model, or a value head for it. See docs/TRAINING.md.",
    )
    verbs = train.add_subparsers(dest="train_command", required=True, metavar="{dpo,irft,value-head}")
    dpo = verbs.add_parser(
        "dpo",
        help="a baseline aligned to a target reward, by DPO on the model's own scored samples",
        description="Sample --samples-per-prompt answers per prompt from the model (on the engine of --engine), "
        "score them with --reward, pair each prompt's best and worst, and train a LoRA adapter with TRL's "
        "DPOTrainer against the SFT model. Interrupt at any time; the same command resumes.",
    )
    data = dpo.add_argument_group("data and sampling")
    data.add_argument(
        "--prompts",
        type=Path,
        default=_default_data_file("prompts.jsonl"),
        metavar="FILE",
        help='JSONL of {"id", "prompt"} lines (default: train/data/prompts.jsonl)',
    )
    data.add_argument(
        "--reward",
        default=None,
        metavar="NAME",
        help="the target reward, any reward of the registry (default: ALIGND_TARGET_REWARD)",
    )
    data.add_argument("--samples-per-prompt", type=int, default=4, help="answers sampled per prompt (%(default)s)")
    data.add_argument("--max-new-tokens", type=int, default=48, help="longest sampled answer (%(default)s)")
    data.add_argument("--sample-temperature", type=float, default=1.0, help="sampling temperature (%(default)s)")
    data.add_argument(
        "--sample-batch-size", type=int, default=32, help="prompts per engine call and per saved batch (%(default)s)"
    )
    data.add_argument(
        "--tie-margin",
        type=float,
        default=1e-6,
        help="skip a prompt whose best and worst rewards differ by at most this (%(default)s)",
    )

    irft = verbs.add_parser(
        "irft",
        help="a reward learned from demonstrations (IRFT: implicit reward, negatives regenerated)",
        description="Learn the implicit reward beta*log(pi/pi_sft) from demonstrations: DPO's loss with the "
        "demonstration as chosen and the current policy's own generation as rejected, the generations "
        "regenerated at the start of each of --rounds rounds; the reference stays the SFT model.",
    )
    data = irft.add_argument_group("data and generation")
    data.add_argument(
        "--demonstrations",
        type=Path,
        default=_default_data_file("demonstrations.jsonl"),
        metavar="FILE",
        help='JSONL of {"id", "prompt", "response"} lines (default: train/data/demonstrations.jsonl)',
    )
    data.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="T: negatives regenerated T times over the run (1 = one SPIN round) (%(default)s)",
    )
    data.add_argument(
        "--max-new-tokens",
        type=int,
        default=96,
        help="longest generated negative; keep it above the demonstrations' length (%(default)s)",
    )
    data.add_argument("--sample-temperature", type=float, default=1.0, help="sampling temperature (%(default)s)")
    data.add_argument("--generation-batch-size", type=int, default=16, help="prompts per generate call (%(default)s)")

    for parser in (dpo, irft):
        _add_training_options(parser)
        parser.add_argument(
            "--select",
            type=_select_spec,
            default=None,
            metavar="s2l:B|random:B",
            help="train on a subset: S2L data selection (docs/TRAINING.md) or a uniform random one, of budget B "
            "(a count like 100 or a fraction like 0.3); DPO selects its pairs by their chosen answer, IRFT its "
            "demonstrations; the proxy is --model. Recorded in the adapter's manifest",
        )
    value_head = _value_head_parser(verbs)
    for parser in (dpo, irft, value_head):
        own = frozenset(a.dest for a in parser._actions)
        _add_settings_flags(
            parser.add_argument_group(
                "settings (each also ALIGND_<NAME>; --model, --engine and --seed matter here: --seed seeds sampling "
                "and training)"
            ),
            skip=own,
        )
    return {"dpo": dpo, "irft": irft, "value-head": value_head}


def _select_spec(text: str):
    from alignd.train.data import TrainingInputError
    from alignd.train.select import parse_select_option

    try:
        return parse_select_option(text)
    except TrainingInputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _budget(text: str):
    from alignd.train.data import TrainingInputError
    from alignd.train.select import Budget

    try:
        return Budget.parse(text)
    except TrainingInputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


@contextlib.contextmanager
def _command_errors(parser: argparse.ArgumentParser, out) -> Iterator[None]:
    """How `alignd train` and `alignd select` end on an error: bad input (data, options, output folder, reward
    or model configuration) in one line with exit status 2, a failed run with 1, an interruption with
    130 and where its finished work is kept. No traceback."""
    from alignd.errors import AligndError, ClientError, ConfigurationError, ModelPreparationError

    prog = parser.prog
    try:
        yield
    except (ClientError, ConfigurationError, ModelPreparationError) as exc:
        parser.exit(EXIT_BAD_INPUT, f"{prog}: error: {' '.join(exc.message.split())}\n")
    except AligndError as exc:
        parser.exit(1, f"{prog}: error: {' '.join(exc.message.split())}\n")
    except KeyboardInterrupt:
        partial = Path(out).expanduser().absolute()
        parser.exit(
            EXIT_INTERRUPTED,
            f"\n{prog}: interrupted; finished work is kept in {partial}.partial/ - run the "
            "same command again to resume\n",
        )


def _select_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    from alignd.train.select import ProxyOptions

    d = ProxyOptions()
    select = sub.add_parser(
        "select",
        help="select a subset of a training set (S2L, or random), docs/TRAINING.md",
        description="Select training data for `alignd train`. See docs/TRAINING.md.",
    )
    verbs = select.add_subparsers(dest="select_command", required=True, metavar="{s2l,random}")
    s2l = verbs.add_parser(
        "s2l",
        help="S2L: cluster the loss trajectories of a small proxy, spread the budget over the clusters",
        description="Train a proxy (a LoRA adapter of --proxy) on the whole set, record every example's loss at "
        "--checkpoints checkpoints, K-means the trajectories into --clusters clusters, and sample the budget "
        "evenly across them, smallest first. Interrupt at any time; the same command resumes.",
    )
    rand = verbs.add_parser(
        "random",
        help="a uniform random subset (the baseline S2L is compared with)",
        description="A uniform random subset of the set, seeded by --seed.",
    )
    for parser in (s2l, rand):
        data = parser.add_argument_group("data")
        data.add_argument(
            "--data",
            required=True,
            type=Path,
            metavar="FILE",
            help='JSONL demonstrations {"id", "prompt", "response"} or preference pairs '
            '{"id", "prompt", "chosen", "rejected"} (pairs are selected by their chosen answer)',
        )
        data.add_argument(
            "--budget",
            required=True,
            type=_budget,
            metavar="B",
            help="examples to select: a count (100), a fraction (0.3) or a percentage (30%%)",
        )
    proxy = s2l.add_argument_group("proxy and clustering")
    proxy.add_argument(
        "--proxy",
        default=None,
        metavar="MODEL",
        help="the proxy model: 'embedded' or a local model folder (default: --model, the embedded model)",
    )
    proxy.add_argument(
        "--checkpoints",
        type=int,
        default=d.checkpoints,
        help="C: checkpoints of the proxy's training at which losses are taken (%(default)s)",
    )
    proxy.add_argument(
        "--clusters",
        type=int,
        default=None,
        help="K of K-means (default: 100 as in the paper, at most a tenth of the set)",
    )
    proxy.add_argument(
        "--proxy-epochs", type=float, default=d.epochs, help="passes of the proxy over the set (%(default)s)"
    )
    proxy.add_argument("--proxy-learning-rate", type=float, default=d.learning_rate, help="(%(default)s)")
    proxy.add_argument("--proxy-batch-size", type=int, default=d.batch_size, help="examples per step (%(default)s)")
    proxy.add_argument("--proxy-lora-rank", type=int, default=d.lora_rank, help="(%(default)s)")
    proxy.add_argument(
        "--max-length", type=int, default=d.max_length, help="longest prompt + answer, tokens (%(default)s)"
    )
    proxy.add_argument(
        "--loss-batch-size",
        type=int,
        default=d.loss_batch_size,
        help="examples per forward pass when taking losses (%(default)s)",
    )
    for parser in (s2l, rand):
        _add_output_options(parser, "selection")
        own = frozenset(a.dest for a in parser._actions)
        _add_settings_flags(
            parser.add_argument_group("settings (each also ALIGND_<NAME>; --seed seeds the selection)"), skip=own
        )
    return {"s2l": s2l, "random": rand}


def _select(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str]) -> None:
    from alignd.train.select import ProxyOptions, SelectionRun, run_selection

    prog = parser.prog
    if getattr(args, "proxy", None):
        args.model = args.proxy
    try:
        settings = _settings_from_args(args)
    except ValidationError as exc:
        parser.exit(EXIT_BAD_INPUT, f"{prog}: error: invalid settings: {'; '.join(_settings_errors(exc))}\n")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    s2l = args.select_command == "s2l"
    proxy = ProxyOptions(seed=settings.seed)
    if s2l:
        proxy = ProxyOptions(
            checkpoints=args.checkpoints,
            epochs=args.proxy_epochs,
            learning_rate=args.proxy_learning_rate,
            batch_size=args.proxy_batch_size,
            lora_rank=args.proxy_lora_rank,
            max_length=args.max_length,
            loss_batch_size=args.loss_batch_size,
            seed=settings.seed,
        )
    run = SelectionRun(
        settings=settings,
        data_file=args.data,
        out=args.out,
        budget=args.budget,
        method=args.select_command,
        clusters=args.clusters if s2l else None,
        proxy=proxy,
        overwrite=args.overwrite,
        restart=args.restart,
        command=command,
    )
    with _command_errors(parser, args.out):
        out = run_selection(run)
    print(f"selection written to {out}")


def _training_options(args: argparse.Namespace, settings: Settings):
    from alignd.train.tuning import TrainingOptions

    return TrainingOptions(
        beta=args.beta,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=tuple(args.target_modules),
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=settings.seed,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str]) -> None:
    prog = parser.prog
    try:
        settings = _settings_from_args(args)
    except ValidationError as exc:
        parser.exit(EXIT_BAD_INPUT, f"{prog}: error: invalid settings: {'; '.join(_settings_errors(exc))}\n")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    what = "adapter"
    with _command_errors(parser, args.out):
        if args.train_command == "value-head":
            from alignd.train.value_head import HeadTrainingOptions, Shard, TargetOptions, ValueHeadRun, run_value_head

            what = "value head"
            run = ValueHeadRun(
                shard=Shard.parse(args.shard) if args.shard else None,
                settings=settings,
                prompts_file=args.prompts,
                reward=args.reward,
                out=args.out,
                baseline=args.baseline,
                eval_prompts_file=args.eval_prompts,
                overwrite=args.overwrite,
                restart=args.restart,
                command=command,
                targets=TargetOptions(
                    states=_value_head_states(args),
                    top_k=args.top_k,
                    kind=args.targets,
                    answers=args.answers,
                    rollout_len=args.rollout_len,
                    num_rollouts=args.num_rollouts,
                    answer_len=args.answer_len,
                    sample_temperature=args.sample_temperature,
                    concurrency=args.concurrency,
                ),
                training=HeadTrainingOptions(
                    rank=args.rank,
                    epochs=args.epochs,
                    learning_rate=args.learning_rate,
                    batch_size=args.batch_size,
                    ranking_weight=args.ranking_weight,
                    holdout_fraction=args.holdout_fraction,
                    curve_fractions=tuple(args.curve_fractions),
                    alpha=args.alpha if args.alpha is not None else settings.decoding_alpha,
                    seed=settings.seed,
                ),
            )
            out = run_value_head(run)
            if run.shard is not None:
                what = f"the states of shard {run.shard} (the same command without --shard trains)"
        elif args.train_command == "dpo":
            from alignd.train.dpo import DPORun, SamplingOptions, run_dpo

            training = _training_options(args, settings)
            run = DPORun(
                settings=settings,
                prompts_file=args.prompts,
                reward=args.reward or settings.target_reward,
                out=args.out,
                training=training,
                overwrite=args.overwrite,
                restart=args.restart,
                command=command,
                select=args.select,
                sampling=SamplingOptions(
                    samples_per_prompt=args.samples_per_prompt,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.sample_temperature,
                    batch_size=args.sample_batch_size,
                    tie_margin=args.tie_margin,
                ),
            )
            out = run_dpo(run)
        else:
            from alignd.train.irft import GenerationOptions, IRFTRun, run_irft

            run = IRFTRun(
                settings=settings,
                demonstrations_file=args.demonstrations,
                out=args.out,
                rounds=args.rounds,
                training=_training_options(args, settings),
                overwrite=args.overwrite,
                restart=args.restart,
                command=command,
                select=args.select,
                generation=GenerationOptions(
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.sample_temperature,
                    batch_size=args.generation_batch_size,
                ),
            )
            out = run_irft(run)
    print(f"{what} written to {out}")


# After SIGTERM, a run has this long to unwind (engines shut down, the partial folder closed) before it exits
# anyway; its engines then notice their parent is gone and exit too (alignd.vllm_plugin.parent_watch).
SIGTERM_GRACE_S = 10.0


def _interrupt_on_sigterm(out_hint: str) -> None:
    """SIGTERM (``kill``, ``docker stop``, a scheduler's preemption) ends a training or selection run as
    Ctrl-C does: KeyboardInterrupt unwinds through the engines' shutdown and keeps the finished work.
    Python's default for SIGTERM is to die at once, which left the run's vLLM engines behind (and as PID 1
    in a container, to ignore it). A KeyboardInterrupt that lands where it is swallowed (seen while vLLM
    starts its engine) must not keep the run going: after ``SIGTERM_GRACE_S`` it exits regardless, and a
    second SIGTERM exits at once. ``alignd serve`` needs none of this: uvicorn handles both signals."""
    import os
    import signal
    import threading

    def leave() -> None:
        sys.stderr.write(f"\nalignd: interrupted by SIGTERM; finished work is kept in {out_hint}\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    def interrupt(signum, _frame):
        signal.signal(signal.SIGTERM, lambda *_: leave())
        deadline = threading.Timer(SIGTERM_GRACE_S, leave)
        deadline.daemon = True  # a run that unwinds in time exits with its own status
        deadline.start()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> None:
    command = list(sys.argv) if argv is None else ["alignd", *argv]
    parser = argparse.ArgumentParser(prog="alignd", description="Inference server for aligned decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible and native API)")
    _add_settings_flags(serve)
    prepare = sub.add_parser("prepare-model", help="prepare the configured model (convert the embedded one) and exit")
    _add_settings_flags(prepare)
    train_parsers = _train_parsers(sub)
    select_parsers = _select_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in ("train", "select"):
        _interrupt_on_sigterm(
            f"{Path(args.out).expanduser().absolute()}.partial/ (run the same command again to resume)"
        )
    if args.command == "train":
        _train(args, train_parsers[args.train_command], command)
        return
    if args.command == "select":
        _select(args, select_parsers[args.select_command], command)
        return
    settings = load_settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "serve":
        _serve(settings)
    elif args.command == "prepare-model":
        _prepare(settings)


if __name__ == "__main__":
    main()
