# rxverify service image: the API (`rxverify serve`), the one-shot migration and the Celery worker.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RXVERIFY_DATA_DIR=/data \
    RXVERIFY_LOG_FORMAT=json

# libgomp1: torch's CPU kernels use OpenMP; nothing else is needed from the OS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 rxverify \
    && useradd --system --uid 10001 --gid rxverify --create-home --home-dir /home/rxverify rxverify \
    && mkdir -p /data \
    && chown rxverify:rxverify /data

WORKDIR /opt/rxverify

# Dependencies first (read from pyproject.toml), so a code change does not reinstall torch.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY app ./app
COPY worker ./worker
COPY models ./models
COPY migrations ./migrations
RUN pip install --no-deps . && rxverify --help > /dev/null

USER rxverify
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["rxverify", "serve", "--host", "0.0.0.0", "--port", "8000"]
