"""Which weight licences this deployment accepts (DEPTHSITE_ACCEPTED_LICENSES), checked on every path that
uses or fetches weights: job creation, predict and job runs, downloads, imports and exports."""
from __future__ import annotations

from django.conf import settings

from models_registry.catalogue import license_note
from depthsite.exceptions import LicenseError
from models_registry.models import RegisteredModel, WeightFile

SETTING = "DEPTHSITE_ACCEPTED_LICENSES"


def accepted_licenses() -> tuple[str, ...] | None:
    """The accepted SPDX ids as configured, or None when every licence is accepted (unset, empty or "*")."""
    configured = getattr(settings, SETTING, None) or []
    if isinstance(configured, str):
        configured = configured.split(",")
    values = tuple(item.strip() for item in configured if item and item.strip())
    if not values or "*" in values:
        return None
    return values


def license_accepted(license: str) -> bool:
    accepted = accepted_licenses()
    if accepted is None:
        return True
    return (license or "").strip().lower() in {item.lower() for item in accepted}


def model_license_check(*, model: RegisteredModel, weight_file: WeightFile | None = None,
                        uploader: bool = False) -> None:
    """LicenseError (403 / exit 2) naming the licence and the setting when the weights may not be used here.

    `uploader`: the refusal of an upload (web form, API, batch), read by anyone who may upload, anonymous visitors
    included: it names the model's licence, which the form shows anyway, but not the setting nor what it holds;
    the operators' doors (commands, registry API, admin) keep the whole wording."""
    for license in dict.fromkeys([model.license, *([weight_file.license] if weight_file is not None else [])]):
        if weight_file is not None and not license:
            continue  # a file recorded before licences were: its model's licence was checked
        if license_accepted(license):
            continue
        if uploader:
            raise LicenseError(
                f"{model.name} is licensed {license or 'with no stated licence'} ({license_note(license)}), which "
                "this site does not accept; choose another model",
                extra={"field": "model", "model": model.name, "license": license},
            )
        accepted = ", ".join(accepted_licenses() or ())
        raise LicenseError(
            f"{model.name} is licensed {license or 'with no stated licence'} ({license_note(license)}), which this "
            f"deployment does not accept: {SETTING} is {accepted}; choose a model under one of those licences, "
            f"or add {license or 'its licence'} to {SETTING} if your use complies with it",
            extra={"field": "model", "model": model.name, "license": license, "setting": SETTING,
                   "accepted": list(accepted_licenses() or ())},
        )
