"""The model registry: one row per model clients can name, with its per-model settings."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models, transaction
from django.db.models import Q

model_name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$",
    "Use letters, digits and . _ : / @ + - (the name clients send as `model`).",
)


class LLMModelQuerySet(models.QuerySet):
    def servable(self) -> LLMModelQuerySet:
        return self.filter(enabled=True, status=LLMModel.Status.AVAILABLE)

    def find(self, name: str) -> LLMModel | None:
        """The row a client's `model` value means: its name, an alias, or `default`."""
        if name == "default":
            return self.filter(is_default=True).first()
        row = self.filter(name=name).first()
        if row is None:
            # Aliases are few; scanning them works on every database (SQLite has no JSON contains).
            row = next((r for r in self.exclude(aliases=[]) if name in (r.aliases or [])), None)
        return row

    async def afind(self, name: str) -> LLMModel | None:
        if name == "default":
            return await self.filter(is_default=True).afirst()
        row = await self.filter(name=name).afirst()
        if row is None:
            async for r in self.exclude(aliases=[]):
                if name in (r.aliases or []):
                    return r
        return row


# Engine arguments that other settings set, and which one.
MANAGED_ENGINE_ARGS = {
    "model": "the model's path",
    "tokenizer": "the model's path",
    "dtype": "the dtype field",
    "max_model_len": "the context length field",
    "max_num_seqs": "the max batch size field",
    "gpu_memory_utilization": "its field",
    "kv_cache_memory_bytes": "the KV cache field",
    "tensor_parallel_size": "its field",
    "pipeline_parallel_size": "its field",
    "quantization": "its field",
    "enforce_eager": "its field",
}


def vllm_engine_arg_names() -> frozenset[str]:
    """AsyncEngineArgs' field names where vLLM is installed (empty where it is not)."""
    import dataclasses
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return frozenset()
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


class LLMModel(models.Model):
    class Source(models.TextChoices):
        HUGGINGFACE = "hf", "Hugging Face"
        LOCAL = "local", "Local folder"
        GGUF = "gguf", "Imported GGUF"

    class Format(models.TextChoices):
        MLX = "mlx", "mlx-lm / safetensors"
        GGUF = "gguf", "GGUF"

    class Kind(models.TextChoices):
        CHAT = "chat", "Chat"
        EMBEDDING = "embedding", "Embedding"

    class Status(models.TextChoices):
        AVAILABLE = "available", "Available"
        DOWNLOADING = "downloading", "Downloading"
        FAILED = "failed", "Failed"
        DELETING = "deleting", "Deleting"

    name = models.CharField(
        max_length=200,
        unique=True,
        validators=[model_name_validator],
        help_text="The id clients send as `model`.",
    )
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.LOCAL)
    source_ref = models.CharField(
        max_length=500, blank=True, help_text="Hugging Face repo id, or the imported path."
    )
    revision = models.CharField(max_length=100, blank=True)
    path = models.CharField(
        max_length=1000, help_text="Folder (or GGUF file) on disk that the backend loads."
    )
    format = models.CharField(max_length=10, choices=Format.choices, default=Format.MLX)
    size_bytes = models.BigIntegerField(default=0)
    backend = models.CharField(
        max_length=10,
        default="auto",
        choices=[("auto", "auto"), ("mlx", "mlx"), ("vllm", "vllm"), ("llamacpp", "llamacpp")],
        help_text="The engine that serves it; a GGUF file (format GGUF) is always llamacpp's.",
    )
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.AVAILABLE)
    kind = models.CharField(
        max_length=10,
        choices=Kind.choices,
        default=Kind.CHAT,
        help_text="Chat models answer chat and completions; embedding models /v1/embeddings.",
    )
    # Embedding models: how token vectors become one (a sentence-transformers folder says)
    pooling = models.CharField(
        max_length=10,
        blank=True,
        choices=[("mean", "mean"), ("cls", "cls"), ("max", "max"), ("last", "last token")],
    )
    normalize = models.BooleanField(default=False, help_text="Embeddings scaled to unit length.")
    is_default = models.BooleanField(default=False, verbose_name="default")
    aliases = models.JSONField(default=list, blank=True, help_text="Other names clients may use.")

    # --- per-model settings, honoured by the API ---
    enabled = models.BooleanField(default=True, help_text="A disabled model answers 404.")
    context_length = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(16)],
        help_text="Prompt + max_tokens limit. Empty: the model's own.",
    )
    default_temperature = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0), MaxValueValidator(2)]
    )
    default_top_p = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0), MaxValueValidator(1)]
    )
    default_top_k = models.PositiveIntegerField(null=True, blank=True)
    default_min_p = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0), MaxValueValidator(1)]
    )
    default_max_tokens = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    default_presence_penalty = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(-2), MaxValueValidator(2)]
    )
    default_frequency_penalty = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(-2), MaxValueValidator(2)]
    )
    default_repetition_penalty = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.01), MaxValueValidator(10)]
    )
    chat_template = models.TextField(
        blank=True,
        help_text="Jinja chat template overriding the tokenizer's. Empty: the tokenizer's.",
    )
    system_prompt = models.TextField(
        blank=True, help_text="Put before the conversation as a system message when set."
    )
    tool_parser = models.CharField(
        max_length=20,
        blank=True,
        default="",
        choices=[
            ("", "auto: from the chat template"),
            ("hermes", "hermes: <tool_call>{json}</tool_call> (Qwen, Hermes, SmolLM3)"),
            ("llama3_json", 'llama3_json: {"name", "parameters"} (Llama 3.x)'),
            ("mistral", "mistral: [TOOL_CALLS][...]"),
            ("pythonic", "pythonic: [f(x=1)] (LFM2)"),
            ("none", "none: requests with tools are refused"),
        ],
        help_text="How the model writes tool calls. Auto reads its chat template; a template "
        "that cannot render tools gets the generic tool prompt (docs/tools.md).",
    )
    reasoning_parser = models.CharField(
        max_length=10,
        default="auto",
        choices=[
            ("auto", "auto: on when the model has thinking tokens"),
            ("think", "on: <think>...</think> is reasoning"),
            ("none", "off: reasoning stays in the content"),
        ],
        help_text="Whether the model's thinking goes to reasoning_content, apart from content.",
    )
    max_batch_size = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(256)],
        help_text="Sequences decoded together. Empty: the service default.",
    )
    keep_alive_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Unload after this long idle. Empty: stay loaded."
    )
    pinned = models.BooleanField(default=False, help_text="Never unloaded to make room.")

    # --- vLLM's engine settings (the vllm backend reads them; a change restarts its engine) ---
    dtype = models.CharField(
        max_length=10,
        default="auto",
        choices=[(d, d) for d in ("auto", "float32", "bfloat16", "float16")],
        help_text="vLLM: the weights' dtype. auto: float32 on a CPU, the model's own on CUDA.",
    )
    gpu_memory_utilization = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.01), MaxValueValidator(1)],
        help_text="vLLM: the share of GPU memory it reserves (of RAM on a CPU). "
        "Empty: 0.9 on CUDA, 0.2 on a CPU.",
    )
    kv_cache_gb = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.05)],
        verbose_name="KV cache (GiB)",
        help_text="vLLM: KV cache size. Empty: what the memory share leaves.",
    )
    tensor_parallel_size = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(64)]
    )
    pipeline_parallel_size = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(64)]
    )
    quantization = models.CharField(
        max_length=40,
        blank=True,
        help_text="vLLM: the quantization method (awq, gptq, fp8, ...). Empty: from the model.",
    )
    enforce_eager = models.BooleanField(
        null=True, blank=True, help_text="vLLM: no CUDA graphs. Empty: eager on a CPU only."
    )
    engine_args = models.JSONField(
        default=dict,
        blank=True,
        help_text='vLLM: more engine arguments as a JSON object, e.g. {"max_num_batched_tokens": 512}.',
    )

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = LLMModelQuerySet.as_manager()

    class Meta:
        verbose_name = "model"
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_model"
            )
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        self._clean_engine_args()
        gguf = self.format == LLMModel.Format.GGUF
        if gguf and self.backend not in ("auto", "llamacpp"):
            raise ValidationError(
                {
                    "backend": "This model is a GGUF file, which llamacpp serves as it is; for "
                    "mlx, import the file again with `import_model FILE --backend mlx` (converts)."
                }
            )
        if not gguf and self.backend == "llamacpp":
            raise ValidationError(
                {"backend": "llamacpp serves GGUF files; this model is a folder of safetensors."}
            )
        for alias in self.aliases or []:
            if not isinstance(alias, str) or alias == "default":
                raise ValidationError(
                    {"aliases": "Aliases are names (strings), and not `default`."}
                )
            other = LLMModel.objects.exclude(pk=self.pk).find(alias)
            if other is not None:
                raise ValidationError({"aliases": f"`{alias}` already names model {other}."})

    def _clean_engine_args(self) -> None:
        args = self.engine_args
        if not isinstance(args, dict):
            raise ValidationError({"engine_args": "A JSON object of engine argument names."})
        for name in args:
            if name in MANAGED_ENGINE_ARGS:
                raise ValidationError(
                    {"engine_args": f"`{name}` is set by {MANAGED_ENGINE_ARGS[name]}: use that."}
                )
        known = vllm_engine_arg_names() if args else frozenset()
        unknown = sorted(set(args) - known) if known else []
        if unknown:
            raise ValidationError({"engine_args": f"vLLM has no engine argument `{unknown[0]}`."})

    @transaction.atomic
    def make_default(self) -> None:
        if self.kind != LLMModel.Kind.CHAT:
            raise ValueError(f"{self.name!r} is an embedding model; the default is a chat model")
        LLMModel.objects.filter(is_default=True).exclude(pk=self.pk).update(is_default=False)
        self.is_default = True
        self.save(update_fields=["is_default", "updated_at"])


class Download(models.Model):
    """A model being fetched from the Hugging Face hub by a Celery worker (see models_app/downloads.py).

    The worker writes progress here a few times per second; the admin, `pull_model --wait` and anyone
    else read it. Setting `cancel_requested` asks the worker to stop; it notices within a fraction of a
    second while bytes flow.
    """

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    FINISHED = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)

    repo_id = models.CharField(
        max_length=200,
        verbose_name="repo id",
        help_text="Hugging Face repo, e.g. mlx-community/SmolLM2-135M-Instruct.",
    )
    revision = models.CharField(max_length=100, default="main", help_text="Branch, tag or commit.")
    include = models.JSONField(
        default=list,
        blank=True,
        help_text="Glob patterns of the files to fetch. Empty: config, tokenizer and safetensors files.",
    )
    name = models.CharField(
        max_length=200,
        validators=[model_name_validator],
        help_text="The model name to register (what clients send as `model`).",
    )
    status = models.CharField(
        max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    commit = models.CharField(
        max_length=64, blank=True, help_text="The commit `revision` resolved to."
    )
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    rate = models.FloatField(default=0.0, help_text="Transfer rate, bytes per second.")
    eta_seconds = models.FloatField(null=True, blank=True, verbose_name="ETA (s)")
    files_done = models.PositiveIntegerField(default=0)
    files_total = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="Celery node running it.")
    cancel_requested = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    model = models.ForeignKey(
        LLMModel,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="downloads",
        help_text="The model registered when the download completed.",
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision} -> {self.name}"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def percent(self) -> float | None:
        """Bytes done as a percentage of the total, once the total is known."""
        if self.status == self.Status.COMPLETED:
            return 100.0
        if not self.bytes_total:
            return None
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    @property
    def percent_display(self) -> str:
        percent = self.percent
        return "-" if percent is None else f"{percent:.1f}%"
