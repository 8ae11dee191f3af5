"""Probe analysis as a job API: /v1/probe/jobs."""
