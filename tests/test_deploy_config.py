"""docker-compose.yml, orthanc/orthanc.json and the app's Settings must agree (AE titles, hosts, ports).

Docker is not run here: the files are parsed and cross-checked. `deploy_problems` lists every
disagreement; the mutation tests prove each check can fail.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ORTHANC_JSON = ROOT / "orthanc" / "orthanc.json"
RADCOHORT_SERVICES = ("radcohort-api", "radcohort-scp", "radcohort-worker")
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _resolve(value) -> str:
    """Compose interpolation with an empty environment: ${X:-default} -> default."""
    return _VAR.sub(lambda m: m.group(2) or "", str(value))


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _resolve(v) for k, v in env.items()}


def _container_ports(service: dict) -> set[int]:
    ports = set()
    for p in service.get("ports") or []:
        target = p.get("target") if isinstance(p, dict) else str(p).split(":")[-1].split("/")[0]
        ports.add(int(target))
    return ports


def _settings_for(service: dict) -> Settings:
    env = {k[len("RADCOHORT_"):].lower(): v for k, v in _env(service).items()
           if k.startswith("RADCOHORT_") and v != ""}
    return Settings(_env_file=None, **env)


def _command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def deploy_problems(compose: dict, orthanc: dict, dockerfile_text: str) -> list[str]:
    """Every way the deployment files disagree with each other or with Settings."""
    problems: list[str] = []
    services = compose.get("services") or {}
    defaults = Settings(_env_file=None)
    for name in ("orthanc", "postgres", *RADCOHORT_SERVICES):
        if name not in services:
            problems.append(f"service {name} missing")
    if problems:
        return problems

    # every RADCOHORT_ variable is a real setting and the service's settings validate
    fields = set(Settings.model_fields)
    for name in RADCOHORT_SERVICES + ("radcohort-migrate",):
        svc = services.get(name)
        if svc is None:
            continue
        for key in _env(svc):
            if key.startswith("RADCOHORT_") and key[len("RADCOHORT_"):].lower() not in fields:
                problems.append(f"{name}: {key} is not a setting")
        try:
            _settings_for(svc)
        except Exception as exc:  # noqa: BLE001 - report, don't crash the check
            problems.append(f"{name}: settings do not validate: {exc}")
    if problems:
        return problems  # the checks below need valid settings

    # Orthanc knows our SCP: AE title, host (= the compose service name) and port
    mod = (orthanc.get("DicomModalities") or {}).get("radcohort")
    scp = services["radcohort-scp"]
    scp_settings = _settings_for(scp)
    if not mod:
        problems.append("orthanc.json: DicomModalities.radcohort missing")
    else:
        aet, host, port = (mod["AET"], mod["Host"], int(mod["Port"])) if isinstance(mod, dict) else \
            (mod[0], mod[1], int(mod[2]))
        if aet != scp_settings.ae_title:
            problems.append(f"orthanc.json AET {aet} != scp RADCOHORT_AE_TITLE {scp_settings.ae_title}")
        if aet != defaults.ae_title:
            problems.append(f"orthanc.json AET {aet} != Settings default {defaults.ae_title}")
        if host not in services:
            problems.append(f"orthanc.json host {host} is not a compose service")
        elif host != "radcohort-scp":
            problems.append(f"orthanc.json host {host} is not the SCP service")
        if port != scp_settings.scp_port:
            problems.append(f"orthanc.json port {port} != scp RADCOHORT_SCP_PORT {scp_settings.scp_port}")
        if port != defaults.scp_port:
            problems.append(f"orthanc.json port {port} != Settings default {defaults.scp_port}")
        if port not in _container_ports(scp):
            problems.append(f"scp service does not publish port {port}")
        if isinstance(mod, dict) and not mod.get("AllowMove"):
            problems.append("orthanc.json: radcohort may not C-MOVE")
    if scp_settings.scp_host not in ("0.0.0.0", "::"):
        problems.append(f"scp listens on {scp_settings.scp_host}: unreachable from the orthanc container")
    # the calling AE of the API (SCU) must be the one Orthanc lists too
    for name in ("radcohort-api", "radcohort-worker"):
        if _settings_for(services[name]).ae_title != scp_settings.ae_title:
            problems.append(f"{name} AE title differs from the SCP's")

    # the orthanc service runs this very file on the ports the file names
    orth = services["orthanc"]
    mounts = [str(v) for v in orth.get("volumes") or []]
    if not any(m.split(":")[0] in ("./orthanc/orthanc.json", "orthanc/orthanc.json")
               and m.split(":")[1].startswith("/etc/orthanc/") for m in mounts):
        problems.append("orthanc service does not mount ./orthanc/orthanc.json into /etc/orthanc/")
    for key in ("DicomPort", "HttpPort"):
        if int(orthanc.get(key, 0)) not in _container_ports(orth):
            problems.append(f"orthanc service does not publish {key} {orthanc.get(key)}")
    if not orthanc.get("RemoteAccessAllowed"):
        problems.append("orthanc.json: RemoteAccessAllowed false: the API container cannot reach it")

    # the database URL points at the postgres service with its credentials
    pg_env = _env(services["postgres"])
    for name in RADCOHORT_SERVICES:
        url = urlsplit(_settings_for(services[name]).database_url.replace("+psycopg", ""))
        if url.scheme != "postgresql" or url.hostname != "postgres":
            problems.append(f"{name}: database URL does not point at the postgres service")
            continue
        if (url.username, url.password, url.path.lstrip("/")) != (
                pg_env.get("POSTGRES_USER"), pg_env.get("POSTGRES_PASSWORD"), pg_env.get("POSTGRES_DB")):
            problems.append(f"{name}: database credentials differ from the postgres service")

    # the API publishes and health-checks its own port
    api = services["radcohort-api"]
    api_settings = _settings_for(api)
    if api_settings.api_port not in _container_ports(api):
        problems.append(f"api does not publish its port {api_settings.api_port}")
    if f":{api_settings.api_port}/health" not in json.dumps(api.get("healthcheck", {})):
        problems.append("api health check does not call /health on its port")
    if api_settings.api_host not in ("0.0.0.0", "::"):
        problems.append("api listens on loopback inside its container")

    # one shared data volume at RADCOHORT_DATA_DIR (the SCP writes what the worker reads)
    for name in RADCOHORT_SERVICES:
        svc = services[name]
        data_dir = str(_settings_for(svc).data_dir)
        if not any(str(v).split(":")[1] == data_dir for v in svc.get("volumes") or [] if ":" in str(v)):
            problems.append(f"{name}: no volume at RADCOHORT_DATA_DIR {data_dir}")
    # health checks everywhere, the GPU reservation on the worker
    for name in ("orthanc", "postgres", *RADCOHORT_SERVICES):
        if not services[name].get("healthcheck"):
            problems.append(f"{name}: no healthcheck")
    devices = (((services["radcohort-worker"].get("deploy") or {}).get("resources") or {})
               .get("reservations") or {}).get("devices") or []
    if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
        problems.append("radcohort-worker: no NVIDIA GPU reservation")
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            if dep not in services:
                problems.append(f"{name} depends on unknown service {dep}")
    # the images build from the Dockerfile's own targets
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile_text, re.M | re.I))
    for name, svc in services.items():
        build = svc.get("build")
        if isinstance(build, dict):
            if not (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).exists():
                problems.append(f"{name}: Dockerfile {build.get('dockerfile')} missing")
            if build.get("target") and build["target"] not in targets:
                problems.append(f"{name}: build target {build['target']} not in the Dockerfile")
    return problems


@pytest.fixture(scope="module")
def files():
    return (yaml.safe_load(COMPOSE.read_text()), json.loads(ORTHANC_JSON.read_text()),
            (ROOT / "docs" / "deploy" / "Dockerfile").read_text())


def test_compose_orthanc_and_settings_agree(files):
    assert deploy_problems(*files) == []


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c, o: o["DicomModalities"]["radcohort"].update(AET="OTHER"), "AET OTHER"),
        (lambda c, o: o["DicomModalities"]["radcohort"].update(Host="scp"), "host scp"),
        (lambda c, o: o["DicomModalities"]["radcohort"].update(Port=104), "port 104"),
        (lambda c, o: c["services"]["radcohort-scp"]["environment"].update(RADCOHORT_SCP_PORT="4000"),
         "RADCOHORT_SCP_PORT 4000"),
        (lambda c, o: c["services"]["radcohort-scp"]["environment"].update(RADCOHORT_AE_TITLE="X"),
         "RADCOHORT_AE_TITLE X"),
        (lambda c, o: c["services"]["radcohort-api"]["environment"].update(RADCOHORT_AE_TILTE="X"),
         "RADCOHORT_AE_TILTE is not a setting"),
        (lambda c, o: c["services"]["radcohort-api"]["environment"].update(RADCOHORT_SCP_PORT="notaport"),
         "settings do not validate"),
        (lambda c, o: c["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="x"),
         "credentials differ"),
        (lambda c, o: o.update(DicomPort=104), "DicomPort 104"),
        (lambda c, o: c["services"]["radcohort-worker"].pop("deploy"), "GPU reservation"),
        (lambda c, o: c["services"]["radcohort-scp"].pop("healthcheck"), "radcohort-scp: no healthcheck"),
        (lambda c, o: c["services"]["radcohort-scp"].update(volumes=[]), "no volume at RADCOHORT_DATA_DIR"),
        (lambda c, o: c["services"]["orthanc"].update(volumes=[]), "does not mount"),
        (lambda c, o: c["services"].pop("radcohort-scp"), "service radcohort-scp missing"),
    ],
)
def test_each_disagreement_is_reported(files, mutate, expected):
    compose, orthanc, dockerfile = copy.deepcopy(files)
    mutate(compose, orthanc)
    problems = deploy_problems(compose, orthanc, dockerfile)
    assert any(expected in p for p in problems), problems


def test_compose_commands_are_real_cli_commands(files):
    """Each container runs a `radcohort` subcommand that the CLI actually registers."""
    import typer.main

    from app.cli import cli

    root = typer.main.get_command(cli)
    for name, svc in files[0]["services"].items():
        cmd = _command(svc)
        if not cmd or cmd[0] != "radcohort":
            continue
        group, args = root, cmd[1:]
        while args and hasattr(group, "commands") and args[0] in group.commands:
            group, args = group.commands[args[0]], args[1:]
        assert group is not root, f"{name}: `{' '.join(cmd)}` is not a radcohort command"
        known = {o for p in group.params for o in p.opts + p.secondary_opts}
        for a in args:
            if a.startswith("--"):
                assert a in known, f"{name}: {a} is not an option of `{' '.join(cmd[:2])}`"


def test_orthanc_json_is_what_the_test_fixture_starts_from():
    """The tests and the demo start Orthanc from orthanc/orthanc.json, overriding only ports/paths/modalities."""
    from app.devtools.orthanc import ORTHANC_CONFIG, OrthancServer

    assert ORTHANC_CONFIG == ORTHANC_JSON
    cfg = OrthancServer(Path("/tmp/unused"), dicom_port=1, http_port=2).config()
    base = json.loads(ORTHANC_JSON.read_text())
    # queries and moves are allowed only from registered modalities, as on a hospital PACS
    for key in ("DicomAlwaysAllowFind", "DicomAlwaysAllowMove", "DicomAlwaysAllowGet"):
        assert cfg[key] is False and base[key] is False
    assert cfg["DicomAet"] == base["DicomAet"]


def test_readme_documents_every_setting():
    """Each RADCOHORT_ variable Settings reads appears in README's configuration table."""
    readme = (ROOT / "README.md").read_text()
    table = {m for m in re.findall(r"^\| `(RADCOHORT_\w+)`", readme, re.M)}
    wanted = {f"RADCOHORT_{name.upper()}" for name in Settings.model_fields}
    assert wanted - table == set(), "README configuration table misses these variables"
    assert table - wanted == set(), "README documents variables Settings does not read"
