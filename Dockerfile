# The opsflow worker/CLI image used by docker-compose.temporal.yml (not used by the lab or the tests).
# Production code only: lab/ (the local rehearsal environment) is not copied; the CLI's `lab` command says so.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY opsflow opsflow
COPY workflows workflows
COPY activities activities
COPY worker worker
COPY starters starters
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
CMD ["opsflow-worker"]
