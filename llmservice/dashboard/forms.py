"""Forms of the dashboard pages: a Hugging Face download, a new API key."""

from __future__ import annotations

from django import forms
from django.utils import timezone

from llmservice.dashboard.actions import PLAYGROUND_PREFIX
from llmservice.models import ApiKey


class DownloadForm(forms.Form):
    repo_id = forms.CharField(
        label="Repo id",
        max_length=200,
        widget=forms.TextInput(
            attrs={"placeholder": "mlx-community/SmolLM2-135M-Instruct", "size": 40}
        ),
    )
    revision = forms.CharField(
        max_length=100, initial="main", required=False, help_text="Branch, tag or commit."
    )
    include = forms.CharField(
        label="Include patterns",
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "cols": 40}),
        help_text="Glob patterns, one per line or comma-separated. Empty: config, tokenizer and "
        "safetensors files.",
    )
    name = forms.CharField(
        max_length=200,
        required=False,
        help_text="The model name clients will send (default: the repo id).",
    )

    def clean(self):
        from models_app import downloads

        data = super().clean()
        if self.errors:
            return data
        try:
            data["repo_id"], data["revision"], data["name"] = downloads.validate_request(
                data.get("repo_id", ""), data.get("revision", ""), data.get("name")
            )
        except downloads.DownloadError as exc:
            raise forms.ValidationError(str(exc)) from exc
        raw = data.get("include", "").replace(",", "\n")
        data["include"] = [p.strip() for p in raw.splitlines() if p.strip()]
        return data


class ApiKeyForm(forms.ModelForm):
    allowed_models = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="None ticked: every model.",
    )

    class Meta:
        model = ApiKey
        fields = ["name", "allowed_models", "rpm_limit", "tpm_limit", "expires_at"]
        widgets = {
            "expires_at": forms.DateTimeInput(
                attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"
            ),
        }
        help_texts = {"expires_at": "UTC. Empty: never expires."}

    def __init__(self, *args, **kwargs):
        from models_app.models import LLMModel

        super().__init__(*args, **kwargs)
        names = LLMModel.objects.values_list("name", flat=True)
        self.fields["allowed_models"].choices = [(n, n) for n in names]

    def clean_name(self):
        name = self.cleaned_data["name"].strip()
        if name.startswith(PLAYGROUND_PREFIX):
            raise forms.ValidationError(
                f"Names starting with {PLAYGROUND_PREFIX} are the playground's own keys."
            )
        return name

    def clean_expires_at(self):
        expires = self.cleaned_data.get("expires_at")
        if expires is not None and expires <= timezone.now():
            raise forms.ValidationError("The expiry must be in the future.")
        return expires

    def create(self) -> tuple[ApiKey, str]:
        """The new key and its secret (shown once, stored only as a digest)."""
        key, secret = ApiKey.generate(self.cleaned_data["name"])
        for field in ("allowed_models", "rpm_limit", "tpm_limit", "expires_at"):
            setattr(key, field, self.cleaned_data[field])
        key.save()
        return key, secret
