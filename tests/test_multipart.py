"""``multipart/form-data`` parsing (``streamer.server.multipart``): bodies made by a real client's encoder (httpx2,
which the ``openai`` SDK sends with), curl-style bodies written out by hand, and malformed ones."""

from __future__ import annotations

import httpx2
import pytest

from streamer.server.multipart import MAX_PARTS, FormError, header_params, parse_form


def encoded(data: dict[str, str | list[str]], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    request = httpx2.Request("POST", "http://127.0.0.1/v1/audio/transcriptions", data=data, files=files)
    return request.read(), request.headers["Content-Type"]


def test_a_form_as_the_sdk_encodes_it() -> None:
    audio = b"RIFF\r\n--not-the-boundary\r\n\r\n\x00\xff" * 100  # binary, with line breaks and dashes in it
    body, content_type = encoded({"model": "whisper-1", "timestamp_granularities[]": ["word", "segment"],
                                  "prompt": "kitchen, lights \u00e9"}, {"file": ("speech.wav", audio, "audio/wav")})
    form = parse_form(body, content_type)
    assert form.get("model") == "whisper-1" and form.get("prompt") == "kitchen, lights \u00e9"
    assert form.fields["timestamp_granularities[]"] == ["word", "segment"]
    assert form.files["file"].data == audio and form.files["file"].filename == "speech.wav"
    assert form.files["file"].content_type == "audio/wav" and form.get("absent") is None


def test_hand_written_forms_with_a_preamble_quoted_parameters_and_an_rfc_5987_filename() -> None:
    body = (b"preamble to ignore\r\n--XyZ\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n"
            b"--XyZ\r\ncontent-disposition: form-data; filename*=UTF-8''r%C3%A9sum%C3%A9.flac; name=file\r\n\r\n"
            b"fLaC\r\n--XyZ--\r\nepilogue")
    form = parse_form(body, 'multipart/form-data; charset=utf-8; boundary="XyZ"')
    assert form.get("language") == "en" and form.files["file"].filename == "r\u00e9sum\u00e9.flac"
    assert form.files["file"].data == b"fLaC" and form.files["file"].content_type == "application/octet-stream"
    assert header_params('form-data; name="a;b"; filename="say \\"hi\\".wav"') == (
        "form-data", {"name": "a;b", "filename": 'say "hi".wav'})


@pytest.mark.parametrize(("body", "content_type", "words"), [
    (b"{}", "application/json", "multipart/form-data"),
    (b"--b\r\n", "multipart/form-data", "boundary"),
    (b"no boundary here", "multipart/form-data; boundary=b", "does not occur"),
    (b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n', "multipart/form-data; boundary=b", "closing"),
    (b"--b\r\nContent-Type: text/plain\r\n\r\n1\r\n--b--", "multipart/form-data; boundary=b", "name="),
    (b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n\xff\xfe\r\n--b--', "multipart/form-data; boundary=b",
     "UTF-8"),
    (b'--b junk\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--b--', "multipart/form-data; boundary=b",
     "line break"),
    (b"".join(b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n' for _ in range(MAX_PARTS + 1))
     + b"--b--", "multipart/form-data; boundary=b", "more than"),
])
def test_malformed_forms_are_refused_saying_what_is_wrong(body: bytes, content_type: str, words: str) -> None:
    with pytest.raises(FormError, match=words):
        parse_form(body, content_type)
