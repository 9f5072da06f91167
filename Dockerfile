# One image for every role: the Dask scheduler, the Dask workers and the API (sae serve).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sae ./sae
COPY worker ./worker
COPY service ./service
# the allocator settings of the worker processes (deploy/dask.yaml says why)
COPY deploy/dask.yaml /etc/dask/sae-workers.yaml
RUN pip install . \
    && useradd --create-home --uid 1000 sae \
    && mkdir -p /data /state \
    && chown sae:sae /data /state

USER sae
VOLUME ["/data", "/state"]
EXPOSE 8000 8786 8787

# Default role: the API with an embedded LocalCluster; docker-compose.yml overrides the command.
CMD ["sae", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-root", "/data", "--state-dir", "/state"]
