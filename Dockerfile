# One image runs every Steward process: python -m services.<name>, python -m gateway, steward …
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STEWARD_DATA_DIR=/tmp/steward \
    STEWARD_GATEWAY_CONSOLE_DIR=/app/console

WORKDIR /app
# Exact versions with hashes first (a layer that changes only with the lock), then Steward itself.
COPY requirements/runtime.lock requirements/build.lock requirements/
RUN pip install --no-cache-dir --require-hashes --no-deps \
        -r requirements/runtime.lock -r requirements/build.lock
COPY pyproject.toml README.md ./
COPY libs libs
COPY services services
COPY gateway gateway
COPY cli cli
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && useradd --system --uid 10001 --no-create-home steward \
    && install -d -o 10001 /audit
COPY console console

# Runs as a non-root user with a read-only root file system (writes only under /tmp, and
# /audit where a volume keeps approval's signed audit checkpoints).
USER 10001
EXPOSE 8000 8001 8101 8102 8103 8104 8105
CMD ["python", "-m", "gateway"]
