"""TLS on the Storage SCP, with a throwaway CA, server and client certificate made by the openssl CLI."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from app.context import AppContext
from app.db.migrate import upgrade
from app.db.models import Instance
from app.dicom.scp import ConnectionDispatcher
from app.wiring import storage_scp
from app.errors import InvalidInput
from tests.conftest import make_settings
from tests.conftest import testdata as sample_file
from tests.dicom.test_scp import SENDER, add_node, count, dataset_bytes, store_files

# a skip fails CI (CI=true, tests/conftest.py): .ci/common.sh installs the openssl package
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _issue(d: Path, name: str, ext: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem (self-signed), server.pem/.key for localhost/127.0.0.1, client.pem/.key."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=radcohort test CA", cwd=d)
    _issue(d, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(d, "client", "extendedKeyUsage=clientAuth\n")
    return d


def _ctx(tmp_path: Path, pki: Path, *, client_ca: bool = False, **kw):
    s = make_settings(tmp_path, scp_tls_cert=pki / "server.pem", scp_tls_key=pki / "server.key",
                      scp_tls_ca=(pki / "ca.pem") if client_ca else None, **kw)
    upgrade(s.database_url)
    c = AppContext.build(s)
    add_node(c, "sender", SENDER)
    return c


@pytest.fixture
def tls_ctx(tmp_path, pki):
    c = _ctx(tmp_path, pki)
    yield c
    c.close()


def client_tls(pki: Path, *, cert: bool = False) -> tuple[ssl.SSLContext, str]:
    """pynetdicom's tls_args: verify the server against the test CA (and name), optionally present a cert."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    return ctx, "localhost"


def associate(port: int, files: list[Path], tls_args=None):
    ae = AE(SENDER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    return ae.associate("127.0.0.1", port, ae_title="RADCOHORT", tls_args=tls_args)


def store_over_tls(port: int, files: list[Path], tls_args) -> list[int]:
    assoc = associate(port, files, tls_args)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


def assert_bit_exact_and_indexed(ctx, files: list[Path]) -> None:
    with ctx.sessions() as s:
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
    assert len(rows) == len(files)
    for f in files:
        row = rows[dcmread(f, stop_before_pixels=True).SOPInstanceUID]
        assert row.source_node == "sender"
        assert dataset_bytes(ctx.settings.store_dir / row.file_path) == dataset_bytes(f)


FILES = ["RG1_J2KR.dcm", "RG3_UNCR.dcm"]


def test_store_over_tls_is_bit_exact_and_indexed(tls_ctx, pki, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes undecoded
    files = [sample_file(n) for n in FILES]
    with storage_scp(tls_ctx) as scp:
        assert store_over_tls(scp.port, files, client_tls(pki)) == [0, 0]
    assert_bit_exact_and_indexed(tls_ctx, files)


def test_plain_association_to_a_tls_scp_fails_and_stores_nothing(tls_ctx, pki):
    f = sample_file("RG3_UNCR.dcm")
    with storage_scp(tls_ctx) as scp:
        assoc = associate(scp.port, [f])
        assert not assoc.is_established
        # the SCP keeps serving TLS peers after the failed handshake
        assoc = associate(scp.port, [f], client_tls(pki))
        assert assoc.is_established
        assoc.release()
    assert count(tls_ctx) == 0 and store_files(tls_ctx) == []


def test_client_must_trust_the_server(tls_ctx, pki, tmp_path):
    """A client that verifies against another CA refuses our server (nothing is sent)."""
    other = tmp_path / "other"
    other.mkdir()
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "o.key", "-out", "o.pem", "-days", "2", "-subj", "/CN=other", cwd=other)
    with storage_scp(tls_ctx) as scp:
        assoc = associate(scp.port, [], (ssl.create_default_context(cafile=str(other / "o.pem")), "localhost"))
        assert not assoc.is_established


def test_with_a_ca_a_client_without_certificate_is_refused(tmp_path, pki, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    c = _ctx(tmp_path, pki, client_ca=True)
    f = sample_file("RG3_UNCR.dcm")
    try:
        with storage_scp(c) as scp:
            assoc = associate(scp.port, [f], client_tls(pki, cert=False))
            assert not assoc.is_established
            assert count(c) == 0 and store_files(c) == []
            # the same client with a certificate the CA signed gets in
            assert store_over_tls(scp.port, [f], client_tls(pki, cert=True)) == [0]
        assert_bit_exact_and_indexed(c, [f])
    finally:
        c.close()


def test_pdu_guard_still_applies_inside_tls(tls_ctx, pki):
    """A PDU header declaring 2 GB, sent inside TLS, closes the connection before any buffering."""
    with storage_scp(tls_ctx) as scp:
        tls, name = client_tls(pki)
        with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as raw:
            with tls.wrap_socket(raw, server_hostname=name) as s:
                s.sendall(b"\x01\x00" + (2**31).to_bytes(4, "big") + b"\x00" * 64)
                try:
                    assert s.recv(1) == b""
                except (ConnectionResetError, ssl.SSLError):
                    pass  # closed, either way
        # and a well-behaved TLS peer still gets in
        assoc = associate(scp.port, [], client_tls(pki))
        assert assoc.is_established
        assoc.release()


def test_tls_through_the_connection_dispatcher(tls_ctx, pki, monkeypatch):
    """`radcohort scp --processes N`: the dispatcher hands raw sockets over; each SCP process
    does the TLS handshake itself (here one handoff SCP in this process)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    s = tls_ctx.settings
    dispatcher = ConnectionDispatcher(s.scp_host, s.scp_port, 1)
    # a copy of the child end: dispatcher.start() closes its own, as a parent does after the fork
    scp = storage_scp(tls_ctx).start(channel=dispatcher.child_channels()[0].dup())
    try:
        dispatcher.start()
        f = sample_file("RG1_J2KR.dcm")
        assert not associate(s.scp_port, [f]).is_established
        assert store_over_tls(s.scp_port, [f], client_tls(pki)) == [0]
        assert_bit_exact_and_indexed(tls_ctx, [f])
    finally:
        dispatcher.close()
        scp.stop()


def test_tls_settings_are_checked_at_start(tmp_path, pki):
    with pytest.raises(ValidationError, match="set together"):
        make_settings(tmp_path, scp_tls_cert=pki / "server.pem")
    with pytest.raises(ValidationError, match="scp_tls_ca needs"):
        make_settings(tmp_path, scp_tls_ca=pki / "ca.pem")
    # a key that does not match the certificate fails start-up, not the first peer
    s = make_settings(tmp_path, scp_tls_cert=pki / "server.pem", scp_tls_key=pki / "client.key")
    upgrade(s.database_url)
    c = AppContext.build(s)
    try:
        with pytest.raises(InvalidInput, match="RADCOHORT_SCP_TLS"):
            storage_scp(c, load_labels=False).start()
    finally:
        c.close()


def test_dcmtk_storescu_with_a_client_certificate(tmp_path, pki):
    """Interop with another TLS stack: dcmtk's storescu, mutual TLS."""
    c = _ctx(tmp_path, pki, client_ca=True)
    f = sample_file("RG3_UNCR.dcm")
    try:
        with storage_scp(c) as scp:
            base = ["/usr/bin/storescu", "-aet", SENDER, "-aec", "RADCOHORT"]
            plain = subprocess.run([*base, "127.0.0.1", str(scp.port), str(f)],
                                   capture_output=True, text=True, timeout=60)
            assert plain.returncode != 0 and count(c) == 0
            r = subprocess.run([*base, "+tls", str(pki / "client.key"), str(pki / "client.pem"),
                                "+cf", str(pki / "ca.pem"), "127.0.0.1", str(scp.port), str(f)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        with c.sessions() as s:
            row = s.scalars(select(Instance)).one()
        assert row.sop_instance_uid == dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert (c.settings.store_dir / row.file_path).stat().st_size == row.file_size
    finally:
        c.close()


def test_scu_speaks_tls_to_a_node_with_tls_options(tmp_path, pki):
    """PacsNode.options["tls"] = {"ca", "cert", "key"}: DicomClient (echo/find/move/get) uses TLS."""
    from types import SimpleNamespace

    from app.dicom.scu import DicomClient
    from app.errors import PermanentDicomError, RetriableDicomError

    c = _ctx(tmp_path, pki, client_ca=True)
    add_node(c, "self", c.settings.ae_title)  # the SCP accepts only registered calling AE titles
    try:
        with storage_scp(c) as scp:
            def node(tls):
                return SimpleNamespace(name="pacs", ae_title="RADCOHORT", host="localhost", port=scp.port,
                                       options={"tls": tls} if tls else {})

            full = {"ca": str(pki / "ca.pem"), "cert": str(pki / "client.pem"), "key": str(pki / "client.key")}
            assert DicomClient(c.settings, node(full), retries=0).echo() >= 0
            for bad in (None, {"ca": full["ca"]}):  # plain, and TLS without the client certificate
                with pytest.raises(RetriableDicomError):
                    DicomClient(c.settings, node(bad), retries=0).echo()
            with pytest.raises(PermanentDicomError, match="TLS settings"):
                DicomClient(c.settings, node({"ca": str(tmp_path / "missing.pem")}), retries=0).echo()
    finally:
        c.close()
