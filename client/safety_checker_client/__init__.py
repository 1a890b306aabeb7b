"""The thin client of the Triton-served safety checker: contract, preprocessing, client, `check`; no heavy deps."""
