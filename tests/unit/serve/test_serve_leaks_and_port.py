"""What `serve` says back and writes down: a DICOM's free-text tags only as terms of a fixed
vocabulary, an access log without query strings, and a port it can really listen on."""

import logging
import importlib

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import dicom_bytes
from stagewise.cli import app
from stagewise.errors import RunError
from stagewise.serve.scorer import describe
from stagewise.serve.server import log_config, run_server


def _dicom(view: str, modality: str) -> bytes:
    return dicom_bytes(np.zeros((4, 4)), Modality=modality, ViewPosition=view, BitsStored=12, HighBit=11)


def test_free_text_dicom_tags_come_back_only_as_vocabulary_terms():
    leaked = describe(_dicom("JANE DOE", "JANE"), "x.dcm")
    assert leaked["view_position"] == "other" and leaked["modality"] == "other"
    assert "JANE" not in repr(leaked)
    fine = describe(_dicom("PA", "DX"), "x.dcm")
    assert fine["view_position"] == "PA" and fine["modality"] == "DX"
    assert "view_position" not in describe(_dicom("", "CR"), "x.dcm")  # no tag: nothing said


def test_the_access_log_line_holds_the_path_but_never_the_query_string():
    spec = dict(log_config()["formatters"]["access"])
    module, _, name = spec.pop("()").rpartition(".")
    formatter = getattr(importlib.import_module(module), name)(**spec)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "POST", "/explain?patient=DOE_JOHN_MRN0042", "1.1", 200), None)
    line = formatter.format(record)
    assert '"POST /explain HTTP/1.1" 200' in line and "DOE_JOHN" not in line and "?" not in line
    assert record.args[2].endswith("MRN0042")  # the record other handlers see is untouched


@pytest.mark.parametrize("port", [0, 70000])
def test_a_port_outside_1_to_65535_is_refused_before_anything_starts(tmp_path, port):
    with pytest.raises(RunError, match=f"--port {port}: a port is a number from 1 to 65535"):
        run_server(tmp_path / "no-bundle", port=port)
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2 and "65535" in result.output
