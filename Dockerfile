# teaserve on an NVIDIA GPU. PyPI's Linux torch wheels are CUDA builds that carry their own CUDA runtime; the host
# needs the NVIDIA driver and the NVIDIA Container Toolkit:
#   docker build -t teaserve .
#   docker run --gpus all -p 8091:8091 -v teaserve-data:/data teaserve Qwen/Qwen-Image --cache-backend tea_cache
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/huggingface

RUN pip install torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY teaserve ./teaserve
RUN pip install . \
    && useradd --create-home --uid 1000 teaserve \
    && mkdir -p /data \
    && chown teaserve /data

USER teaserve
# Model weights (the Hugging Face cache) live here: mount a volume to keep them.
VOLUME /data
EXPOSE 8091
# Loading a large model takes minutes: the start period covers it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8091/health', timeout=4)"]
ENTRYPOINT ["teaserve", "serve", "--host", "0.0.0.0", "--port", "8091"]
