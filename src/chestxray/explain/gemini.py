"""A short text explanation of a prediction from Google Gemini (google-genai SDK).

Optional and bounded: with no key, on an error, a timeout, a 429 quota answer or an empty or
malformed response, ``explain_prediction`` returns ``(None, reason)`` and the caller carries on
with the prediction alone. Nothing here ever raises.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemini-2.5-flash"
API_VERSION = "v1beta"  # POST {base_url}/v1beta/models/{model}:generateContent
# The SDK's timeout bounds each network read; this pool bounds the whole call, including a server
# that trickles bytes. A call that overruns is abandoned (it ends on the SDK's own timeout).
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="gemini")

PROMPT = """You are helping a clinician read the output of an automated chest X-ray classifier.
The classifier is decision support only; it is not a diagnosis and may be wrong.

Classifier output:
- classes it can output: {classes} (it recognises no other finding and must call every image one of these)
- predicted class: {predicted_class}, probability {confidence:.1%}
- next most probable class: {runner_up}
- class probabilities: {probabilities}
- uncertainty: {uncertainty}

The attached image is the X-ray with a Grad-CAM heatmap over it: red/yellow areas influenced the
class {explained_class} most, blue areas least.

In at most 120 words of plain text (no headings, no lists): first name the model's output class and
how certain the model is, using the probabilities above{low_confidence_instruction}; then say what
the heatmap suggests the model looked at, whether those regions are plausible for this finding, and
what could make the output unreliable (for example text or markers on the film, or an image unlike
the training data; if a warning above says the image is outside the validated population, say so
plainly and how it differs). Do not state or confirm a diagnosis, do not recommend treatment, and end by
reminding the reader that this is not a diagnosis and a qualified clinician must interpret the image."""

LOW_CONFIDENCE = ("LOW CONFIDENCE -- the model's confidence is below the level where its validation accuracy "
                  "drops under target; the output should not be relied on")
LOW_CONFIDENCE_INSTRUCTION = ", and say plainly that the model flagged this output as low confidence"


def build_prompt(prediction: dict[str, Any], explained_class: str | None = None) -> str:
    """The text part of the request: the predicted class, every class' probability and the uncertainty."""
    ranked = sorted(prediction["probabilities"].items(), key=lambda item: -item[1])
    runner_up = next(((c, p) for c, p in ranked if c != prediction["predicted_class"]), None)
    uncertainty = LOW_CONFIDENCE if prediction.get("low_confidence") else "not flagged as low confidence"
    warnings = [w for w in prediction.get("warnings", []) if w != "low_confidence"]
    if warnings:
        uncertainty += "; warnings: " + "; ".join(_warning_in_words(w, prediction) for w in warnings)
    return PROMPT.format(
        classes=", ".join(prediction["probabilities"]),
        predicted_class=prediction["predicted_class"],
        confidence=prediction["confidence"],
        runner_up=f"{runner_up[0]} {runner_up[1]:.1%}" if runner_up else "none",
        probabilities=", ".join(f"{c} {p:.1%}" for c, p in prediction["probabilities"].items()),
        uncertainty=uncertainty,
        low_confidence_instruction=LOW_CONFIDENCE_INSTRUCTION if prediction.get("low_confidence") else "",
        explained_class=explained_class or prediction["predicted_class"],
    )


def _warning_in_words(code: str, prediction: dict[str, Any]) -> str:
    """A warning named in words ("outside validated population"), with the answer's own words for it if any."""
    words = (prediction.get("warning_messages") or {}).get(code)
    name = code.replace("_", " ").upper()
    return f"{name} -- {words}" if words else name


def load_sdk() -> None:
    """Import the google-genai SDK now (seconds on a slow machine), outside any call's timeout."""
    from google import genai  # noqa: F401
    from google.genai import errors, types  # noqa: F401


def _client(api_key: str, base_url: str | None, timeout_s: float):
    from google import genai
    from google.genai import types

    # No retries (the SDK default): a retry after a 429 or a timeout would only push past the deadline.
    # The API version is pinned because SDK releases have changed their default (v1beta vs v1).
    options = types.HttpOptions(base_url=base_url or None, api_version=API_VERSION, timeout=int(timeout_s * 1000))
    return genai.Client(api_key=api_key, http_options=options)


def _generate(api_key: str, model: str, base_url: str | None, timeout_s: float, prompt: str, png: bytes) -> str | None:
    from google.genai import types

    client = _client(api_key, base_url, timeout_s)  # keep a reference: a collected client closes its connection
    try:
        response = client.models.generate_content(
            model=model,
            contents=[types.Part.from_bytes(data=png, mime_type="image/png"), prompt],
            config=types.GenerateContentConfig(temperature=0.2),
        )
        return response.text
    finally:
        client.close()


def _reason(exc: BaseException) -> str:
    """A short reason, in words, for a failed call (never the request content)."""
    from google.genai import errors

    if isinstance(exc, errors.APIError):
        if exc.code == 429:
            return "Gemini quota exceeded (HTTP 429); try again later"
        if exc.code in (401, 403):
            return f"Gemini refused the API key (HTTP {exc.code})"
        return f"Gemini API error (HTTP {exc.code})"
    if "timeout" in type(exc).__name__.lower():
        return "Gemini did not answer in time"
    if isinstance(exc, ValueError):  # JSONDecodeError, pydantic's ValidationError: not the API's JSON
        return "Gemini returned a malformed answer"
    return f"Gemini call failed ({type(exc).__name__})"


def explain_prediction(
    prediction: dict[str, Any],
    gradcam_png: bytes,
    *,
    api_key: str | None,
    model: str = DEFAULT_MODEL,
    base_url: str | None = None,
    timeout_s: float = 10.0,
    explained_class: str | None = None,
) -> tuple[str | None, str | None]:
    """Ask Gemini for a careful explanation of `prediction`; returns (text, None) or (None, reason)."""
    if not api_key:
        return None, "no Gemini API key configured (set GEMINI_API_KEY)"
    prompt = build_prompt(prediction, explained_class)
    load_sdk()  # a no-op once imported; the deadline below covers the call alone, never the import
    future = _POOL.submit(_generate, api_key, model, base_url, timeout_s, prompt, gradcam_png)
    try:
        text = future.result(timeout=timeout_s + 1.0)
    except concurrent.futures.TimeoutError:
        future.cancel()
        return None, "Gemini did not answer in time"
    except Exception as exc:  # any failure of an optional extra must not fail the prediction
        reason = _reason(exc)
        log.warning("gemini explanation unavailable: %s", reason)
        return None, reason
    if not isinstance(text, str) or not text.strip():
        return None, "Gemini returned no usable text"
    return text.strip(), None
