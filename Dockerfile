FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY libs libs
COPY services services
COPY cli cli
RUN pip install --no-cache-dir . && useradd --system --uid 10001 steward
USER 10001
EXPOSE 8101
CMD ["python", "-m", "services.authz"]
