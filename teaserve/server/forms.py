"""Multipart requests as the OpenAI SDK and curl send them: files, text fields, and `extra_body` values as text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException

from ..engine.params import SamplingFields, json_or_text, shown_value, values_from_strings
from .errors import OpenAIError, _validation_message

Body = TypeVar("Body", bound=SamplingFields)

MAX_FORM_FIELDS = 100


async def read_form(request: Request, *, max_files: int, max_part_size: int) -> FormData:
    """The request's form; a malformed one, or a body that is no form, answers 400."""
    try:
        return await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS, max_part_size=max_part_size)
    except MultiPartException as error:
        raise OpenAIError(400, f"invalid multipart form: {error.message}") from None
    except AssertionError as error:  # starlette's answer to a non-multipart content type
        raise OpenAIError(400, f"send the request as multipart/form-data: {error}") from None


@dataclass
class FormParts:
    """A form sorted into its parts; nothing in it is read or decoded yet."""

    files: dict[str, list[UploadFile]] = field(default_factory=dict)
    """The uploads of each file parameter."""
    fields: dict[str, str] = field(default_factory=dict)
    cache_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, form: FormData, file_fields: Mapping[str, str]) -> FormParts:
        """Files under the keys of `file_fields`, grouped by the parameter each key names; cache_config as JSON or
        the SDK's cache_config[name] parts; every other field as text, each at most once."""
        parts = cls(files={param: [] for param in file_fields.values()})
        for key, value in form.multi_items():
            param = file_fields.get(key)
            if param is not None:
                if not isinstance(value, UploadFile):
                    raise OpenAIError(400, f"{key} must be a file upload", param=param)
                parts.files[param].append(value)
            elif key == "cache_config" or key.startswith("cache_config["):
                parts.cache_config.update(_form_cache_config(key, value))
            elif isinstance(value, UploadFile):
                raise OpenAIError(
                    400, f"unexpected file in field {key!r}; files go in {', '.join(file_fields)}", param=key
                )
            elif key in parts.fields:
                raise OpenAIError(400, f"parameter {key!r} was given more than once", param=key)
            else:
                parts.fields[key] = value
        return parts

    def body(self, model: type[Body]) -> Body:
        """The text fields as `model`, validated like a JSON body (numbers and booleans parsed from their text)."""
        try:
            body = model.model_validate(values_from_strings(model, self.fields))
        except ValidationError as error:
            message, param = _validation_message(dict(error.errors()[0]))
            raise OpenAIError(400, message, param=param) from None
        if self.cache_config:
            body.cache_config = self.cache_config
        return body


def _form_cache_config(key: str, value: Any) -> dict[str, Any]:
    """cache_config sent in a form: a JSON object string, or the SDK's flattened cache_config[name] parts."""
    if isinstance(value, UploadFile):
        raise OpenAIError(400, "cache_config must be a text field", param="cache_config")
    if key == "cache_config":
        parsed = json_or_text(value)
        if not isinstance(parsed, dict):
            raise OpenAIError(
                400, f"cache_config must be a JSON object, got {shown_value(value)}", param="cache_config"
            )
        return parsed
    name = key[len("cache_config[") : -1] if key.endswith("]") else ""
    if not name:
        raise OpenAIError(400, f"malformed form field {shown_value(key)}", param="cache_config")
    return {name: json_or_text(value)}
