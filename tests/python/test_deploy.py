"""Checks of deploy/ (deploy/Dockerfile, deploy/k8s/) that need neither a Docker engine nor a
cluster:

- the manifests parse, the kustomization lists each of them, every volume mount names a volume
  of its pod, every ConfigMap, Secret and PersistentVolumeClaim a pod uses is defined by the
  kustomization or (Secrets) created by a command in deploy/README.md with the keys used;
- every KVH_* name in deploy/ is a key src/config/mod.rs accepts (or one of its OTHER_ENV);
- every kvh command line (container commands, shell scripts, probes) names a verb of the built
  kvh and only flags that verb's --help lists;
- the Dockerfile copies what scripts/build-release.sh produces, and every /opt/kvhygiene path
  in deploy/ is part of that layout; the builder's Rust is new enough for Cargo.lock;
- the security settings (non-root uid shared with the image, no privilege escalation, no
  capabilities, read-only root filesystems) and the metrics wiring agree across the files;
- and the pod is run, on this machine, from the manifests themselves: the init container's
  script, a process with the server container's environment (the ConfigMap, the key files,
  LD_PRELOAD) allocating through the library, the probes against what it exported, and the
  CronJob's script over the log it wrote (exit 0), a tampered log (exit 1) and no log (2).

Neither `docker build` nor `kubectl apply` is run (deploy/README.md says what that leaves).
"""

import functools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_c_abi import ROOT, kvh_binary, library

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DEPLOY_README = DEPLOY / "README.md"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# The image built from deploy/Dockerfile, as the manifests name it (ENTRYPOINT ["kvh"]).
KVH_IMAGE_REPO = "registry.example.com/kvhygiene"
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


# ---------------------------------------------------------------------------------------------
# Reading the files


def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@functools.lru_cache(maxsize=None)
def objects() -> tuple:
    """Every Kubernetes object of the manifests, as (file name, object)."""
    return tuple((p.name, doc) for p in MANIFESTS for doc in load_yaml(p))


def kustomization() -> dict:
    (doc,) = load_yaml(K8S / "kustomization.yaml")
    return doc


def the(kind: str, name: str) -> dict:
    found = [o for _, o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} definitions in deploy/k8s"
    return found[0]


def pod_specs() -> list:
    """(label, pod spec) of every workload: Deployment, StatefulSet, DaemonSet, Job, CronJob."""
    out = []
    for _, o in objects():
        label = f"{o['kind'].lower()}/{o['metadata']['name']}"
        spec = o.get("spec", {})
        if o["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            out.append((label, spec["template"]["spec"]))
    return out


def containers(spec: dict) -> list:
    return [("initContainer", c) for c in spec.get("initContainers", [])] + [
        ("container", c) for c in spec["containers"]
    ]


def install_container(spec: dict) -> dict:
    """The pod's init container that runs to completion (not a native sidecar)."""
    (c,) = [c for c in spec["initContainers"] if c.get("restartPolicy") != "Always"]
    return c


def is_kvh_image(image: str) -> bool:
    return image.rsplit(":", 1)[0] == KVH_IMAGE_REPO


def container_argv(c: dict) -> list:
    """What the container runs: command + args, or the kvh image's entrypoint + args."""
    if c.get("command"):
        return list(c["command"]) + list(c.get("args", []))
    if is_kvh_image(c["image"]):
        return ["kvh"] + list(c.get("args", []))
    return list(c.get("args", []))


def dockerfile_instructions() -> list:
    """(INSTRUCTION, rest) of deploy/Dockerfile, continuation lines joined. Comment and empty
    lines are dropped, inside a continued instruction too (as Docker does)."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        word, _, rest = (current + line).partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerfile_stages() -> list:
    """[(stage name or None, [(INSTRUCTION, rest), ...]), ...]"""
    stages = []
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            stages.append((m.group(2), [(word, rest)]))
        elif stages:
            stages[-1][1].append((word, rest))
    return stages


def dockerfile_args() -> dict:
    """Default values of the ARGs declared before the first FROM."""
    out = {}
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            out[k] = v
    return out


@functools.lru_cache(maxsize=None)
def release_layout() -> frozenset:
    """The files of a distribution, as scripts/build-release.sh defines them (no build)."""
    proc = subprocess.run(
        [str(ROOT / "scripts/build-release.sh"), "--list-layout"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    files = frozenset(proc.stdout.split())
    assert {"bin/kvh", "lib/libkvhygiene.so", "lib/libkvhygiene_preload.so"} <= files, files
    return files | {"BUILD-INFO", "MANIFEST"}  # written by the build itself


def in_layout(rel: str) -> bool:
    """Whether `rel` is a file of the distribution or a directory holding some."""
    rel = rel.strip("/")
    return rel == "" or rel in release_layout() or any(f.startswith(rel + "/") for f in release_layout())


def accepted_env_names() -> set:
    """The KVH_* variables the library accepts, from its source of truth, src/config/mod.rs: the
    KEYS table (`key!("name", ...)` -> KVH_NAME) and OTHER_ENV (read by other parts)."""
    src = (ROOT / "src/config/mod.rs").read_text()
    keys = re.findall(r'key!\(\s*"([a-z0-9_]+)"', src)
    other = re.search(r"const OTHER_ENV: &\[&str\] = &\[([^\]]*)\]", src)
    assert len(keys) >= 20 and "log_dir" in keys and other, "src/config/mod.rs changed shape: update this parser"
    return {"KVH_" + k.upper() for k in keys} | set(re.findall(r'"(KVH_[A-Z0-9_]+)"', other.group(1)))


# ---------------------------------------------------------------------------------------------
# kvh's own description of its command line


@functools.lru_cache(maxsize=None)
def kvh_help(*verb: str) -> str:
    proc = subprocess.run([kvh_binary(), *verb, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kvh {' '.join(verb)} --help: {proc.stderr}"
    return proc.stdout


def kvh_verbs() -> set:
    commands = kvh_help().split("Commands:", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"^  ([a-z][a-z0-9-]*)\s", commands, re.M)) - {"help"}


def kvh_flags(verb: str) -> set:
    return set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", kvh_help(verb), re.M))


OPERATORS = set(";&|<>()")


def shell_commands(script: str) -> list:
    """The simple commands of a shell script, as argv lists (enough for the scripts here)."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        cmd = []
        for token in list(lexer) + [";"]:
            if token and set(token) <= OPERATORS:
                # Leading NAME=value words are assignments, not the command.
                while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(token)
    return out


def kvh_argvs(argv: list) -> list:
    """Every kvh invocation in an argv: itself, or the commands of a `sh -c` script."""
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        # `exec kvh ...` runs kvh too.
        commands = [cmd[1:] if cmd[0] == "exec" else cmd for cmd in shell_commands(argv[2])]
        return [cmd[1:] for cmd in commands if cmd and Path(cmd[0]).name == "kvh"]
    return [argv[1:]] if argv and Path(argv[0]).name == "kvh" else []


def kvh_command_lines() -> list:
    """(where, argv after `kvh`) of every kvh command line in the manifests."""
    out = []
    for label, spec in pod_specs():
        for role, c in containers(spec):
            where = f"{label} {role} {c['name']}"
            out += [(where, a) for a in kvh_argvs(container_argv(c))]
            for probe in PROBES:
                cmd = c.get(probe, {}).get("exec", {}).get("command")
                if cmd:
                    out += [(f"{where} {probe}", a) for a in kvh_argvs(list(cmd))]
    return out


# ---------------------------------------------------------------------------------------------
# Static checks


def test_every_manifest_parses_as_kubernetes_objects():
    assert MANIFESTS, "no manifests in deploy/k8s"
    for path in MANIFESTS:
        docs = load_yaml(path)
        assert docs, f"{path.name}: no object"
        for doc in docs:
            assert isinstance(doc, dict), f"{path.name}: not a mapping"
            for field in ("apiVersion", "kind", "metadata"):
                assert field in doc, f"{path.name}: no {field}"
            assert doc["metadata"].get("name"), f"{path.name}: {doc['kind']} without a name"


def test_kustomization_lists_every_manifest_and_nothing_else():
    k = kustomization()
    assert k["kind"] == "Kustomization"
    listed = k.get("resources", [])
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    assert sorted(listed) == [p.name for p in MANIFESTS], (
        f"kustomization.yaml resources {sorted(listed)} != manifests in deploy/k8s {[p.name for p in MANIFESTS]}"
    )


def test_every_kvh_env_name_is_a_key_the_library_accepts():
    accepted = accepted_env_names()
    files = [DOCKERFILE, DEPLOY_README, *MANIFESTS, K8S / "kustomization.yaml"]
    used = {}
    for path in files:
        for name in re.findall(r"\bKVH_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            used.setdefault(name, path.relative_to(ROOT))
    unknown = {n: str(p) for n, p in used.items() if n not in accepted}
    assert not unknown, (
        f"KVH_* names the library does not accept (src/config/mod.rs KEYS / OTHER_ENV): {unknown}; "
        "an unknown KVH_* variable stops the library at start"
    )
    # Env entries of the manifests, too (the regex above would not see a computed name).
    for label, spec in pod_specs():
        for _, c in containers(spec):
            for e in c.get("env", []):
                if e["name"].startswith("KVH_"):
                    assert e["name"] in accepted, f"{label} {c['name']}: {e['name']}"
    for _, o in objects():
        if o["kind"] == "ConfigMap":
            for name in o.get("data", {}):
                assert not name.startswith("KVH") or name in accepted, f"ConfigMap {o['metadata']['name']}: {name}"


def test_every_kvh_name_in_any_deploy_file_is_a_key_the_library_accepts():
    """Every KVH_* name in any file under deploy/ (the Prometheus rules, the operator's
    manifests and the dashboard included, not only the pod manifests) is a variable the
    library accepts, as ARCHITECTURE.md states for deploy/ as a whole; the one other is the
    tests' KVH_BLESS switch, in the comment that says how the generated PrometheusRule is
    regenerated."""
    accepted = accepted_env_names() | {"KVH_BLESS"}
    unknown = {}
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        for name in re.findall(r"\bKVH_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
            if name not in accepted:
                unknown.setdefault(name, str(path.relative_to(ROOT)))
    assert not unknown, f"KVH_* names in deploy/ that the library does not accept: {unknown}"


def test_kvh_preload_is_a_switch_and_library_paths_are_in_the_distribution():
    # KVH_PRELOAD is on/off, not a path: anything else makes the interposers fail allocations.
    values = {}
    for label, spec in pod_specs():
        for _, c in containers(spec):
            for e in c.get("env", []):
                values.setdefault(e["name"], []).append((f"{label} {c['name']}", e.get("value")))
    for _, o in objects():
        if o["kind"] == "ConfigMap":
            for k, v in o.get("data", {}).items():
                values.setdefault(k, []).append((f"ConfigMap {o['metadata']['name']}", v))
    for where, v in values.get("KVH_PRELOAD", []):
        assert v in ("on", "off"), f"{where}: KVH_PRELOAD={v!r}; it is on or off"
    for name, want in (("LD_PRELOAD", "lib/libkvhygiene_preload.so"), ("KVH_LIBRARY", "lib/libkvhygiene.so")):
        for where, v in values.get(name, []):
            assert v == "/opt/kvhygiene/" + want, f"{where}: {name}={v!r}"
    env = [rest for word, rest in dockerfile_instructions() if word == "ENV"]
    assert any("KVH_LIBRARY=/opt/kvhygiene/lib/libkvhygiene.so" in e for e in env), env
    assert not any("KVH_PRELOAD" in e for e in env), "KVH_PRELOAD is a switch, not the library's path"


@pytest.mark.parametrize(
    "where,argv", kvh_command_lines(), ids=lambda x: x if isinstance(x, str) else " ".join(x[:1])
)
def test_kvh_command_line_names_a_verb_and_flags_its_help_lists(where, argv):
    assert argv, f"{where}: kvh without a verb"
    verb = argv[0]
    verbs = kvh_verbs()
    if verb not in verbs:
        pytest.fail(f"{where}: `kvh {verb}` is not a verb of {kvh_binary()} (it has {sorted(verbs)})")
    flags = kvh_flags(verb)
    for token in argv[1:]:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in flags, f"{where}: `kvh {verb}` has no flag {flag} (its --help lists {sorted(flags)})"


def test_the_kvh_command_lines_were_found():
    # Guards the parser: the probes, the sidecar and the CronJob's script are all seen.
    found = {tuple(a[:1]) for _, a in kvh_command_lines()}
    expected = {("gate",), ("metrics",), ("serve-metrics",), ("verify-log",), ("evidence",), ("prune-log",)}
    assert expected <= found, found


def test_every_volume_mount_names_a_volume_of_its_pod_and_every_volume_is_used():
    for label, spec in pod_specs():
        volumes = [v["name"] for v in spec.get("volumes", [])]
        assert len(volumes) == len(set(volumes)), f"{label}: a volume defined twice: {volumes}"
        used = set()
        for role, c in containers(spec):
            paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
            assert len(paths) == len(set(paths)), f"{label} {c['name']}: a path mounted twice"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{label} {role} {c['name']}: mounts undefined volume {m['name']}"
                used.add(m["name"])
        assert set(volumes) == used, f"{label}: volumes never mounted: {set(volumes) - used}"


def documented_secrets() -> dict:
    """Secret name -> keys, from the `kubectl create secret generic` commands of deploy/README.md."""
    text = DEPLOY_README.read_text().replace("\\\n", " ")
    out = {}
    for m in re.finditer(r"kubectl create secret generic (\S+)([^\n]*)", text):
        keys = set()
        for f in re.findall(r"--from-file=(\S+)", m.group(2)):
            keys.add(f.split("=", 1)[0] if "=" in f else Path(f).name)
        keys |= set(re.findall(r"--from-literal=([^=\s]+)=", m.group(2)))
        out[m.group(1)] = keys
    return out


def test_referenced_configmaps_secrets_and_claims_are_defined_or_documented():
    listed = set(kustomization().get("resources", []))
    defined = {(o["kind"], o["metadata"]["name"]) for f, o in objects() if f in listed}
    by_hand = documented_secrets()
    for label, spec in pod_specs():

        def need(kind, name, keys=()):
            if kind == "Secret" and (kind, name) not in defined:
                assert name in by_hand, (
                    f"{label}: Secret {name} is neither in the kustomization nor created by a "
                    "`kubectl create secret generic` command in deploy/README.md"
                )
                missing = set(keys) - by_hand[name]
                assert not missing, f"{label}: Secret {name} keys {missing} are not in deploy/README.md's command"
                return
            assert (kind, name) in defined, f"{label}: {kind} {name} is not defined in deploy/k8s"
            if kind == "ConfigMap":
                data = the("ConfigMap", name).get("data", {})
                assert set(keys) <= set(data), f"{label}: ConfigMap {name} lacks {set(keys) - set(data)}"

        for v in spec.get("volumes", []):
            if "configMap" in v:
                need("ConfigMap", v["configMap"]["name"], [i["key"] for i in v["configMap"].get("items", [])])
            if "secret" in v:
                need("Secret", v["secret"]["secretName"], [i["key"] for i in v["secret"].get("items", [])])
            if "persistentVolumeClaim" in v:
                need("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        for _, c in containers(spec):
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef:
                    need("ConfigMap", ef["configMapRef"]["name"])
                if "secretRef" in ef:
                    need("Secret", ef["secretRef"]["name"])
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    need("ConfigMap", ref["configMapKeyRef"]["name"], [ref["configMapKeyRef"]["key"]])
                if "secretKeyRef" in ref:
                    need("Secret", ref["secretKeyRef"]["name"], [ref["secretKeyRef"]["key"]])


def test_no_secret_material_is_committed():
    assert not any(o["kind"] == "Secret" for _, o in objects()), "a Secret object in deploy/k8s"
    k = kustomization()
    assert "secretGenerator" not in k, "kustomization.yaml generates a Secret: keys are created by hand"
    for path in [DOCKERFILE, *MANIFESTS, K8S / "kustomization.yaml"]:
        text = path.read_text()
        assert "PRIVATE KEY" not in text, path
        assert not re.search(r"\b[0-9a-f]{64}\b", text), f"{path}: looks like a committed key"


def test_dockerfile_copies_what_build_release_produces():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "deploy/Dockerfile is not multi-stage"
    names = [n for n, _ in stages]
    assert "builder" in names
    builder = dict(stages)["builder"]
    runs = " ".join(rest for word, rest in builder if word == "RUN")
    m = re.search(r"scripts/build-release\.sh\s+(/\S+)", runs)
    assert m, "the builder stage does not run scripts/build-release.sh OUTDIR"
    dist = m.group(1).rstrip("/")
    assert f"scripts/check-release.sh {dist}" in runs, "the builder does not check the distribution it built"
    copies = []
    for name, instrs in stages:
        for word, rest in instrs:
            if word == "COPY" and "--from=" in rest:
                parts = [p for p in rest.split() if not p.startswith("--")]
                src, dest = parts[0], parts[-1]
                assert re.search(r"--from=builder\b", rest), f"COPY from an unknown stage: {rest}"
                assert src == dist or src.startswith(dist + "/"), f"COPY {src}: not the distribution {dist}"
                rel = src[len(dist):]
                assert in_layout(rel), f"COPY {src}: {rel!r} is not in build-release.sh's layout"
                copies.append((rel.strip("/"), dest))
    assert ("", "/opt/kvhygiene/") in copies, f"the distribution is not copied whole to /opt/kvhygiene: {copies}"


def test_every_opt_kvhygiene_path_is_in_the_distribution():
    files = [DOCKERFILE, DEPLOY_README, *MANIFESTS]
    for path in files:
        for m in re.finditer(r"/opt/kvhygiene((?:/[A-Za-z0-9_.+-]+)*)/?", path.read_text()):
            rel = m.group(1).rstrip(".")  # a sentence's full stop
            assert in_layout(rel), (
                f"{path.relative_to(ROOT)}: /opt/kvhygiene{rel} is not in scripts/build-release.sh --list-layout"
            )


MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def test_every_relative_link_of_the_shipped_docs_resolves_in_the_distribution():
    """A document copied into share/doc/kvhygiene links to files beside it, as in the repository:
    each such target must be shipped at the same place, or the reader of a distribution follows
    a dead link."""
    docs = [f for f in release_layout() if f.startswith("share/doc/kvhygiene/") and f.endswith(".md")]
    assert "share/doc/kvhygiene/README.md" in docs, docs
    dead = []
    for doc in docs:
        source = ROOT / doc.removeprefix("share/doc/kvhygiene/")
        for target in MARKDOWN_LINK.findall(source.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # an absolute URL
            rel = os.path.normpath(os.path.join(os.path.dirname(doc), target))
            if not in_layout(rel):
                dead.append(f"{doc}: {target}")
    assert not dead, "links to files the distribution does not hold at that place:\n" + "\n".join(dead)


def test_dockerfile_runtime_stage():
    stages = dockerfile_stages()
    runtime = stages[-1][1]
    words = [w for w, _ in runtime]
    args = dockerfile_args()
    # Runtime: Debian bookworm slim, pinned; builder: bookworm too (same glibc).
    assert re.fullmatch(r"debian:12\.\d+-slim(@sha256:[0-9a-f]{64})?|debian:bookworm-\d{8}-slim(@sha256:[0-9a-f]{64})?",
                        args["RUNTIME_IMAGE"]), args["RUNTIME_IMAGE"]
    assert re.fullmatch(r"rust:\d+\.\d+\.\d+-bookworm(@sha256:[0-9a-f]{64})?", args["RUST_IMAGE"]), args["RUST_IMAGE"]
    user = [rest for w, rest in runtime if w == "USER"]
    assert user and re.fullmatch(r"\d+:\d+", user[-1]), f"USER must be a numeric uid:gid, got {user}"
    assert ("ENTRYPOINT", '["kvh"]') in runtime and ("CMD", '["demo"]') in runtime
    assert "HEALTHCHECK" not in words, "a HEALTHCHECK here has nothing meaningful to check (see the Dockerfile)"
    run = " ".join(rest for w, rest in runtime if w == "RUN")
    assert "install -d -o 10001 -g 10001 -m 0700 /var/log/kvh" in run
    env = " ".join(rest for w, rest in runtime if w == "ENV")
    assert "/opt/kvhygiene/bin" in env.split("PATH=", 1)[1].split()[0], "kvh is not on PATH"


def test_dockerignore_keeps_build_outputs_out_of_the_context():
    patterns = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")}
    for needed in ("target/", "gpu-artifacts/", "gpu-check-out/", ".tools/", ".git"):
        assert needed in patterns, f".dockerignore lacks {needed}"


def version_tuple(v: str) -> tuple:
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def test_builder_rust_is_new_enough_for_every_locked_package():
    tag = re.match(r"rust:(\d+\.\d+\.\d+)", dockerfile_args()["RUST_IMAGE"]).group(1)
    # The packages of a Linux build (the image's), which are the ones a build here fetched:
    # without --filter-platform cargo would need every platform's (Windows-only crates
    # included), which --offline cannot read from a cache that only builds filled.
    host = re.search(r"^host: (\S+)$", subprocess.run(["rustc", "-vV"], capture_output=True, text=True).stdout, re.M)
    assert host and "linux" in host.group(1), "the release image is built on Linux"
    proc = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--offline", "--filter-platform", host.group(1)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    # What a release build compiles: the workspace and its normal and build dependencies.
    todo, seen = list(meta["workspace_members"]), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            if any(k["kind"] != "dev" for k in dep["dep_kinds"]):
                todo.append(dep["pkg"])
    too_new = {
        f"{packages[p]['name']} {packages[p]['version']}": packages[p]["rust_version"]
        for p in seen
        if packages[p].get("rust_version") and version_tuple(packages[p]["rust_version"]) > version_tuple(tag)
    }
    assert not too_new, f"deploy/Dockerfile's rust:{tag} is older than these packages need: {too_new}"


def test_pods_run_as_the_image_user_without_privileges():
    uid, gid = [rest for w, rest in dockerfile_stages()[-1][1] if w == "USER"][-1].split(":")
    for label, spec in pod_specs():
        sc = spec.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, f"{label}: runAsNonRoot"
        # The library accepts a log directory and key files only when owned by its own uid.
        assert str(sc.get("runAsUser")) == uid and str(sc.get("runAsGroup")) == gid, f"{label}: uid/gid != image's {uid}:{gid}"
        if any("persistentVolumeClaim" in v or "secret" in v for v in spec.get("volumes", [])):
            assert str(sc.get("fsGroup")) == gid, f"{label}: fsGroup"
            # Always (the default) would re-open the log directory's permissions at each start.
            assert sc.get("fsGroupChangePolicy") == "OnRootMismatch", f"{label}: fsGroupChangePolicy"
        assert spec.get("automountServiceAccountToken") is False, f"{label}: automountServiceAccountToken"
        for role, c in containers(spec):
            csc = c.get("securityContext", {})
            where = f"{label} {role} {c['name']}"
            assert csc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities.drop"
            assert csc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert not csc.get("privileged"), f"{where}: privileged"


def server_container() -> dict:
    spec = dict(pod_specs())["deployment/inference-server"]
    return next(c for c in spec["containers"] if c["name"] == "server")


def test_server_requests_a_gpu_and_has_the_three_probes():
    c = server_container()
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert "registry.example.com/your-inference-server" in c["image"], "the server image must stay a marked placeholder"
    assert kvh_argvs(c["readinessProbe"]["exec"]["command"]) == [
        ["gate", "--metrics-file", "/run/kvh/kvh.prom", "--max-age", "60"]
    ]
    for probe in ("startupProbe", "livenessProbe"):
        (argv,) = kvh_argvs(c[probe]["exec"]["command"])
        assert argv[0] == "metrics" and "--max-age" in argv and "--fail-on-security" not in argv, argv


def test_a_restarted_server_container_does_not_pass_its_probes_on_the_last_runs_snapshot():
    # The metrics emptyDir survives a container restart; the snapshot the probes read must
    # be removed when the container starts, or a crashed server's last snapshot passes them.
    c = server_container()
    prom = the("ConfigMap", c["envFrom"][0]["configMapRef"]["name"])["data"]["KVH_METRICS_FILE"]
    command = c["lifecycle"]["postStart"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"] and command[2] == f"rm -f {prom}", command
    read = {flag_value(kvh_argvs(c[p]["exec"]["command"])[0], "--metrics-file" if p == "readinessProbe" else "--file")
            for p in ("readinessProbe", "startupProbe", "livenessProbe")}
    assert read == {prom}, read


def flag_value(argv: list, flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_metrics_file_port_and_scrape_settings_agree():
    spec = dict(pod_specs())["deployment/inference-server"]
    server = server_container()
    policy = the("ConfigMap", server["envFrom"][0]["configMapRef"]["name"])["data"]
    prom = policy["KVH_METRICS_FILE"]
    sidecar = next(c for c in spec["containers"] if c is not server and is_kvh_image(c["image"]))
    (serve,) = kvh_argvs(container_argv(sidecar))
    assert serve[0] == "serve-metrics" and flag_value(serve, "--file") == prom
    for probe in PROBES:
        (argv,) = kvh_argvs(server[probe]["exec"]["command"])
        assert prom in argv, f"{probe} reads {argv}, not the exported {prom}"

    def volume_of(c, path):
        mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"{c['name']}: {path} is not on a volume"
        return max(mounts, key=lambda m: len(m["mountPath"]))["name"]

    shared = volume_of(server, prom)
    assert volume_of(sidecar, prom) == shared
    assert next(v for v in spec["volumes"] if v["name"] == shared).get("emptyDir") is not None
    port = int(flag_value(serve, "--listen").rsplit(":", 1)[1])
    (cport,) = sidecar["ports"]
    assert cport["containerPort"] == port
    annotations = the("Deployment", "inference-server")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    svc = the("Service", "inference-server-kvh-metrics")["spec"]
    assert svc["ports"][0]["targetPort"] in (cport["name"], port)
    assert svc["publishNotReadyAddresses"] is True, "a pod out of rotation must still be scraped"
    labels = the("Deployment", "inference-server")["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()


def ingress_policies_of(labels: dict) -> list:
    """The NetworkPolicies whose podSelector selects pods with these labels for Ingress."""
    out = []
    for _, o in objects():
        if o["kind"] != "NetworkPolicy":
            continue
        spec = o["spec"]
        selector = spec["podSelector"]
        assert set(selector) <= {"matchLabels"}, f"{o['metadata']['name']}: only matchLabels is checked here"
        types = spec.get("policyTypes", ["Ingress"])
        if selector.get("matchLabels", {}).items() <= labels.items() and "Ingress" in types:
            out.append(o)
    return out


def test_the_network_policy_admits_the_pods_ports_and_the_metrics_port_only_from_prometheus():
    """A pod selected for Ingress admits only what some rule allows: every port the pod
    declares must be admitted (or applying the kustomization cuts the server off), and the
    metrics port only from selected pods of a selected namespace, never from everywhere."""
    template = the("Deployment", "inference-server")["spec"]["template"]
    policies = ingress_policies_of(template["metadata"]["labels"])
    assert policies, "no NetworkPolicy restricts who may connect to the inference server's pods"
    for p in policies:
        assert "Egress" not in p["spec"].get("policyTypes", []), (
            f"{p['metadata']['name']} restricts egress: the server may need to fetch models"
        )
    rules = [r for p in policies for r in p["spec"].get("ingress", [])]

    def admits(rule, port):
        listed = rule.get("ports")
        return not listed or any(
            q.get("port") in (port["name"], port["containerPort"])
            and q.get("protocol", "TCP") == port.get("protocol", "TCP")
            for q in listed
        )

    ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
    assert {p["name"] for p in ports} >= {"http", "kvh-metrics"}, ports
    for port in ports:
        assert any(admits(r, port) for r in rules), f"no rule admits the pod's port {port}"
    (metrics,) = [p for p in ports if p["name"] == "kvh-metrics"]
    for rule in (r for r in rules if admits(r, metrics)):
        peers = rule.get("from")
        assert peers, f"a rule admits the metrics port from everywhere: {rule}"
        for peer in peers:
            assert "ipBlock" not in peer, f"the metrics port is admitted from addresses: {peer}"
            for selector in ("namespaceSelector", "podSelector"):
                assert peer.get(selector, {}).get("matchLabels"), (
                    f"the metrics port is admitted from a peer without a {selector} that "
                    f"names labels (an empty one selects everything): {peer}"
                )


def test_build_release_refuses_bad_outdirs_before_building(tmp_path):
    script = str(ROOT / "scripts/build-release.sh")

    def run(*args):
        return subprocess.run([script, *args], capture_output=True, text=True, timeout=60)

    r = run()
    assert r.returncode == 2 and "missing OUTDIR" in r.stderr, r.stderr
    r = run("--frobnicate", str(tmp_path))
    assert r.returncode == 2 and "--frobnicate" in r.stderr, r.stderr
    (tmp_path / "file").write_text("x")
    r = run(str(tmp_path / "file"))
    assert r.returncode == 2 and "is not a directory" in r.stderr, r.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = run(str(busy))
    assert r.returncode == 2 and "not empty" in r.stderr and "--force" in r.stderr, r.stderr
    r = run("--force", str(busy))
    assert r.returncode == 2 and "notes.txt" in r.stderr, r.stderr
    assert (busy / "notes.txt").read_text() == "mine"
    # Entries named like a distribution's are not one: without an earlier MANIFEST, or with
    # files it does not list, --force deletes nothing (a ~/.local-style directory).
    home = tmp_path / "local"
    for rel in ("bin/my-tool", "lib/python3.11/site-packages/mine.py", "share/keyrings/login.keyring"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text("mine")
    r = run("--force", str(home))
    assert r.returncode == 2 and "no MANIFEST" in r.stderr, r.stderr
    (home / "BUILD-INFO").write_text("version: kvh 0.1.0\n")
    import hashlib

    def line(rel):
        return f"{hashlib.sha256((home / rel).read_bytes()).hexdigest()}  {rel}\n"

    (home / "MANIFEST").write_text(line("bin/my-tool"))
    r = run("--force", str(home))
    assert r.returncode == 2 and "does not list" in r.stderr, r.stderr
    # A MANIFEST that lists everything but is not one (no sums), or whose sums no longer match
    # (a file changed since), does not make the files deletable either.
    listed = ("bin/my-tool", "lib/python3.11/site-packages/mine.py", "share/keyrings/login.keyring")
    (home / "MANIFEST").write_text("".join(rel + "\n" for rel in listed))
    r = run("--force", str(home))
    assert r.returncode == 2 and "is not 'SHA256  PATH'" in r.stderr, r.stderr
    (home / "MANIFEST").write_text("".join(line(rel) for rel in listed))
    (home / "bin/my-tool").write_text("mine, edited")
    r = run("--force", str(home))
    assert r.returncode == 2 and "changed since it was built" in r.stderr, r.stderr
    # A name with a newline cannot pass for a listed one.
    odd = home / "lib" / "private\nbin"
    odd.mkdir()
    (odd / "my-tool").write_text("mine")
    (home / "bin/my-tool").write_text("mine")
    r = run("--force", str(home))
    assert r.returncode == 2 and "newline" in r.stderr, r.stderr
    for rel in listed:
        assert (home / rel).read_text() == "mine", rel
    assert (odd / "my-tool").read_text() == "mine"


def assemble_distribution(outdir: Path, overrides: dict = None, build_info: str = None) -> Path:
    """A distribution laid out as scripts/build-release.sh lays one out (its --list-layout),
    from the files built here: bin/ and lib/ from the build, the other files from the checkout,
    a BUILD-INFO as the script writes it, and a MANIFEST of sha256 sums. `overrides` maps a
    path of the layout to the file to put there instead."""
    built = {
        "bin/kvh": Path(kvh_binary()),
        "lib/libkvhygiene.so": Path(library()),
        "lib/libkvhygiene_preload.so": Path(library()).parent / "libkvhygiene_preload.so",
    }
    built.update(overrides or {})
    for rel in sorted(release_layout() - {"BUILD-INFO", "MANIFEST"}):
        src = built.get(rel) or ROOT / rel.removeprefix("share/doc/kvhygiene/")
        dest = outdir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        dest.chmod(0o755 if rel.startswith(("bin/", "lib/")) else 0o644)
    if build_info is None:
        version = subprocess.run([str(outdir / "bin/kvh"), "--version"], capture_output=True, text=True).stdout.strip()
        build_info = (
            f"version: {version}\ncommit: unknown\nbuilt: 2026-01-01T00:00:00Z on x86_64, rustc\n"
            "kernels: committed kernels/scrub.ptx\nglibc needed: GLIBC_2.34\n"
        )
    (outdir / "BUILD-INFO").write_text(build_info)
    import hashlib

    files = sorted(str(f.relative_to(outdir)) for f in outdir.rglob("*") if f.is_file())
    (outdir / "MANIFEST").write_text(
        "".join(f"{hashlib.sha256((outdir / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    )
    return outdir


def check_release(outdir: Path) -> subprocess.CompletedProcess:
    # The assembled BUILD-INFO names the committed PTX (this build's kernels): the check of
    # a kernel build that CI asks for elsewhere does not apply to it.
    env = {k: v for k, v in os.environ.items() if k != "KVHYGIENE_REQUIRE_KERNEL_BUILD"}
    return subprocess.run(
        [str(ROOT / "scripts/check-release.sh"), str(outdir)], capture_output=True, text=True, timeout=600, env=env
    )


def test_check_release_refuses_a_preload_library_without_the_cuda_interposers(tmp_path):
    # lib/libkvhygiene_preload.so is what C++ engines are started with (LD_PRELOAD): it must
    # define the CUDA runtime's allocation entry points (cudaMalloc, cudaFree, ...). A
    # distribution whose preload library is the plain allocator library loads and answers
    # the C API, but interposes nothing: every allocation of the engine bypasses kvhygiene.
    # The release check is expected to refuse it.
    good = check_release(assemble_distribution(tmp_path / "good"))
    assert good.returncode == 0, good.stdout + good.stderr
    broken = assemble_distribution(
        tmp_path / "broken", overrides={"lib/libkvhygiene_preload.so": Path(library())}
    )
    r = check_release(broken)
    assert r.returncode != 0, (
        "scripts/check-release.sh passed a distribution whose lib/libkvhygiene_preload.so "
        "defines no cudaMalloc/cudaFree interposer:\n" + r.stdout[-2000:]
    )


def test_check_release_refuses_a_build_info_that_names_another_version(tmp_path):
    # BUILD-INFO is what an operator or auditor reads to learn what an image holds
    # (deploy/README.md: `docker run --entrypoint cat kvhygiene /opt/kvhygiene/BUILD-INFO`).
    # Its version line is expected to be the version bin/kvh reports; a distribution whose
    # BUILD-INFO names another version is expected to be refused by the release check.
    good = check_release(assemble_distribution(tmp_path / "good"))
    assert good.returncode == 0, good.stdout + good.stderr
    broken = assemble_distribution(
        tmp_path / "broken",
        build_info="version: kvh 9.9.9\ncommit: unknown\nbuilt: 2026-01-01T00:00:00Z on x86_64, rustc\n"
        "kernels: committed kernels/scrub.ptx\nglibc needed: GLIBC_2.34\n",
    )
    r = check_release(broken)
    assert r.returncode != 0, (
        "scripts/check-release.sh passed a distribution whose BUILD-INFO says version kvh 9.9.9 "
        "while bin/kvh is " + subprocess.run([kvh_binary(), "--version"], capture_output=True, text=True).stdout
    )


# ---------------------------------------------------------------------------------------------
# The pod, run here from the manifests


class PodFiles:
    """The file systems the pod's containers see, laid out under one directory: a volume is a
    directory (a PVC one per claim, shared by every pod that mounts it); a path outside every
    mount of a kvh-image container is in that image's /opt/kvhygiene (links to the built files
    at the paths build-release.sh gives them)."""

    def __init__(self, root: Path, secret_data: dict):
        self.root = root
        self.image = root / "image"
        self.secret_data = secret_data
        built = {
            "bin/kvh": Path(kvh_binary()),
            "lib/libkvhygiene.so": Path(library()),
            "lib/libkvhygiene_preload.so": Path(library()).parent / "libkvhygiene_preload.so",
        }
        for rel in release_layout():
            dest = self.image / "opt/kvhygiene" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = built.get(rel, ROOT / rel)
            if src.exists():
                dest.symlink_to(src)
            else:
                dest.write_text("")

    def volume_dir(self, label: str, volume: dict) -> Path:
        if "persistentVolumeClaim" in volume:
            d = self.root / "pvc" / volume["persistentVolumeClaim"]["claimName"]
        else:
            d = self.root / label.replace("/", "_") / volume["name"]
        if not d.exists():
            d.mkdir(parents=True)
            if "secret" in volume:
                s = volume["secret"]
                data = self.secret_data.get(s["secretName"])
                if data is None:
                    # Kubernetes mounts an absent optional Secret as an empty directory.
                    assert s.get("optional"), f"{label}: Secret {s['secretName']} is not there"
                    return d
                # Without items, every key of the Secret is a file of that name.
                for item in s.get("items") or [{"key": k, "path": k} for k in data]:
                    f = d / item["path"]
                    f.write_bytes(data[item["key"]])
                    f.chmod(item.get("mode", s.get("defaultMode", 0o644)))
        return d

    def mapper(self, label: str, spec: dict, c: dict):
        """A function rewriting the container's absolute paths to where they are here."""
        volumes = {v["name"]: v for v in spec["volumes"]}
        prefixes = {m["mountPath"].rstrip("/"): self.volume_dir(label, volumes[m["name"]]) for m in c.get("volumeMounts", [])}
        if is_kvh_image(c["image"]):
            prefixes.setdefault("/opt/kvhygiene", self.image / "opt/kvhygiene")
        pattern = re.compile(
            "(" + "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True)) + r")(?=[/\s\"':]|$)"
        )
        return lambda text: pattern.sub(lambda m: str(prefixes[m.group(1)]), text)

    def env(self, c: dict, remap) -> dict:
        """The container's environment: its env and envFrom (paths rewritten), on top of a
        minimal base (and the kvh image's PATH)."""
        declared = {}
        for ef in c.get("envFrom", []):
            declared.update(the("ConfigMap", ef["configMapRef"]["name"])["data"])
        for e in c.get("env", []):
            declared[e["name"]] = e["value"]
        path = os.environ["PATH"]
        if is_kvh_image(c["image"]):
            path = remap("/opt/kvhygiene") + "/bin:" + path  # the image's ENV PATH
        base = {"PATH": path, "HOME": str(self.root), "LANG": "C.UTF-8"}
        return {**base, **{k: remap(v) for k, v in declared.items()}}


def run_in(cmd: list, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)


def run_install(root: Path, hmac_key: str) -> tuple:
    """The Deployment's pod under `root`, with keys made by hand in its Secret (`hmac_key` the
    HMAC key's text), and its install init container run: (files, label, spec, result)."""
    keys = root / "made-by-hand"
    keys.mkdir(mode=0o700)
    (keys / "hmac.key").write_text(hmac_key)
    r = subprocess.run([kvh_binary(), "keygen", "--out", str(keys / "checkpoint")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    documented = documented_secrets()["kvhygiene-forensic-keys"]
    data = {"kvhygiene-forensic-keys": {k: (keys / k).read_bytes() for k in documented}}
    files = PodFiles(root, data)
    label, spec = "deployment/inference-server", dict(pod_specs())["deployment/inference-server"]
    init = install_container(spec)
    remap = files.mapper(label, spec, init)
    r = run_in([remap(a) for a in container_argv(init)], files.env(init, remap))
    return files, label, spec, r


def installed_pod(root: Path):
    """The Deployment's pod under `root` after its install init container ran: (files, label,
    spec)."""
    files, label, spec, r = run_install(root, secrets.token_hex(32) + "\n")
    assert r.returncode == 0, f"init container failed: {r.stdout}{r.stderr}"
    assert "ready: no check failed" in r.stdout, r.stdout
    return files, label, spec


def test_the_init_container_stops_the_pod_on_a_key_the_library_would_refuse(tmp_path):
    # A Secret whose HMAC key is too short: the library would refuse it at the server's first
    # CUDA allocation, after the model loaded; the init container's preflight says so first.
    files, label, spec, r = run_install(tmp_path, "0123\n")
    assert r.returncode != 0, r.stdout
    assert re.search(r"FAIL +hmac key", r.stdout), r.stdout


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """Runs the Deployment's init container and a process with its server's environment, which
    allocates through the LD_PRELOAD library and exits (writing the metrics file and the
    log's stop record). Returns what the tests need."""
    root = tmp_path_factory.mktemp("pod")
    files, label, spec = installed_pod(root)
    server = server_container()
    remap = files.mapper(label, spec, server)
    env = files.env(server, remap)
    for name in ("KVH_HMAC_KEY_FILE", "KVH_SIGNING_KEY_FILE"):
        mode = stat.S_IMODE(os.stat(env[name]).st_mode)
        assert mode == 0o600 and not os.path.islink(env[name]), f"{name}: the init copy is {oct(mode)}"
    assert Path(env["KVH_LIBRARY"]).is_file(), "KVH_LIBRARY does not name a file after the init container ran"
    # The engine stands in: its allocations go through the C API the preloaded library exports
    # (a real engine's cudaMalloc would reach the same allocator). Host memory here: the
    # ConfigMap's cuda backend is checked by the demo below.
    engine = run_in(
        ["python3", "-c", ENGINE],
        {**env, "KVH_BACKEND": "host"},
    )
    assert engine.returncode == 0, f"the server's environment failed: {engine.stdout}{engine.stderr}"
    assert "cannot be preloaded" not in engine.stderr, engine.stderr
    return {"files": files, "spec": spec, "server": server, "remap": remap, "env": env, "engine": engine}


ENGINE = """
import ctypes, json
lib = ctypes.CDLL(None)  # the global scope: the LD_PRELOAD library's exports
lib.kvh_malloc.restype = ctypes.c_void_p
lib.kvh_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
lib.kvh_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
lib.kvh_stats_json.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
lib.kvh_set_context(b"tenant-a", b"req-1", b"model")
for size in (4096, 1 << 20):
    p = lib.kvh_malloc(size, 0, None)
    assert p, "kvh_malloc failed"
    ctypes.memset(p, 0x5A, size)
    lib.kvh_free(p, size, 0, None)
assert lib.kvh_synchronize() == 0
buf = ctypes.create_string_buffer(1 << 20)
n = ctypes.c_size_t(0)
assert lib.kvh_stats_json(buf, len(buf), ctypes.byref(n)) == 0
stats = json.loads(buf.value)
assert stats["log"]["enabled"], stats["log"]
assert stats["counters"]["verifications_passed"] == 2, stats["counters"]
print("engine ok")
"""


def test_the_python_package_in_the_server_environment_uses_the_preloaded_library(pod):
    # The server container's environment (LD_PRELOAD and KVH_LIBRARY as the Deployment sets
    # them, the image's KVH_LIBRARY too): an engine's Python code that tags its requests with
    # kvhygiene.context() and reads kvhygiene.stats() uses the preloaded library, as the
    # README says load() does in a process started with it.
    python = pod["remap"]("/opt/kvhygiene/python")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import kvhygiene\n"
        "with kvhygiene.context(tenant_id='tenant-a', request_id='req-1', model_id='m'):\n"
        "    pass\n"
        "print('stats', 'counters' in kvhygiene.stats() or 'started' in kvhygiene.stats())\n"
    )
    r = run_in(["python3", "-c", code, python], {**pod["env"], "KVH_BACKEND": "host"})
    assert r.returncode == 0 and "stats True" in r.stdout, (
        f"the Python package under the server's environment: {r.stdout}{r.stderr}"
    )


def test_server_environment_starts_the_library_with_the_policy_and_keys(pod):
    assert "engine ok" in pod["engine"].stdout
    log_dir = Path(pod["env"]["KVH_LOG_DIR"])
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
    assert list(log_dir.glob("kvh-*.jsonl")) and list(log_dir.glob("kvh-*.ckpt")), "no log or checkpoint written"
    assert Path(pod["env"]["KVH_METRICS_FILE"]).is_file()


def test_configmap_policy_is_accepted_by_kvh(pod):
    # Config::from_env reads every KVH_* of the server's environment, the ConfigMap's
    # KVH_BACKEND=cuda included, and refuses unknown keys and bad values (exit 2); --backend
    # host then runs the demo without a GPU.
    r = run_in([kvh_binary(), "demo", "--backend", "host", "--tenants", "1", "--requests", "2", "--decode-tokens", "16"], pod["env"])
    assert r.returncode == 0, f"kvh demo under the server's environment: {r.stdout}{r.stderr}"
    assert pod["env"]["KVH_BACKEND"] == "cuda"


def test_the_init_container_checks_the_policy_the_server_gets():
    spec = dict(pod_specs())["deployment/inference-server"]
    init = install_container(spec)
    script = " ".join(container_argv(init))
    assert "kvh config --strict" in script, script

    def kvh_env(c: dict) -> dict:
        declared = {}
        for ef in c.get("envFrom", []):
            declared.update(the("ConfigMap", ef["configMapRef"]["name"])["data"])
        declared.update({e["name"]: e["value"] for e in c.get("env", [])})
        # KVH_LIBRARY is the Python package's, not the policy's.
        return {k: v for k, v in declared.items() if k.startswith("KVH_") and k != "KVH_LIBRARY"}

    assert kvh_env(init) == kvh_env(server_container()), "the init container must judge the server's KVH_* policy"
    # The check runs before anything is copied: a refused policy leaves the pod with nothing.
    assert script.index("kvh config") < script.index("cp -R"), script
    # The start-up's checks run last, on the key copies the server will read.
    assert script.rstrip().endswith("kvh preflight --skip-backend"), script
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert {"/var/log/kvh", "/run/kvh"} <= mounts, "preflight checks the server's log and metrics volumes"



def test_configmap_policy_weakens_no_control(pod):
    # The example deployment is the recommended posture: a sealed, checkpointed log, metrics
    # for the probes, the defaults' isolation and gate; `kvh config --strict` lists anything less.
    r = run_in([kvh_binary(), "config", "--strict"], pod["env"])
    assert r.returncode == 0, f"kvh config --strict under the server's environment: {r.stdout}{r.stderr}"
    assert "weakened controls: none" in r.stdout, r.stdout


RUNBOOK = ROOT / "docs" / "operations.md"


def runbook_text() -> str:
    """The runbook with its lines joined, so that a command wrapped over lines reads whole."""
    return " ".join(RUNBOOK.read_text().split())


def container_kvh_env(c: dict) -> dict:
    """The KVH_* (and FORENSIC_*) variables a container of the example is given."""
    declared = {}
    for ef in c.get("envFrom", []):
        declared.update(the("ConfigMap", ef["configMapRef"]["name"])["data"])
    declared.update({e["name"]: e["value"] for e in c.get("env", [])})
    return {k: v for k, v in declared.items() if k.startswith(("KVH_", "FORENSIC_"))}


def kvh_config(env: dict, *flags: str) -> subprocess.CompletedProcess:
    return run_in([kvh_binary(), "config", *flags], {"PATH": os.environ["PATH"], **env})


def digest_in(env: dict) -> str:
    r = kvh_config(env, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["config_digest"]


# The runbook's commands for a pod that does not start: the ConfigMap's variables, one per line
# as kubectl's go-template prints them, and the key paths the pod sets, in the environment of
# `kvh config`.
CONFIGMAP_TEMPLATE = '{{range $k, $v := .data}}{{$k}}={{$v}}{{"\\n"}}{{end}}'


def runbook_policy_script() -> str:
    """The runbook's bash lines (a fenced block) that run `kvh config` on the ConfigMap."""
    blocks = re.findall(r"```sh\n(.*?)```", RUNBOOK.read_text(), re.S)
    (block,) = [b for b in blocks if "kubectl get configmap" in b and "kvh config" in b]
    return "\n".join(line.strip() for line in block.splitlines())


def run_policy_script(tmp_path, data: dict, kvh: str) -> subprocess.CompletedProcess:
    """The runbook's lines run by bash, with a kubectl that prints what the go-template makes
    of a ConfigMap holding `data` (kubectl ranges over a map in key order)."""
    script = runbook_policy_script()
    m = re.search(r"kubectl get configmap (\S+) -o go-template='([^']*)'", script)
    assert m, script
    name, template = m.groups()
    assert name == "kvhygiene-policy" and template == CONFIGMAP_TEMPLATE, m.group(0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rendered = "".join(f"{k}={v}\n" for k, v in sorted(data.items()))
    (bin_dir / "kubectl").write_text(f"#!/bin/sh\nprintf '%s' {shlex.quote(rendered)}\n")
    (bin_dir / "kubectl").chmod(0o755)
    (bin_dir / "kvh").symlink_to(kvh)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return run_in(["bash", "-c", script], env, cwd=tmp_path)


def test_the_runbooks_policy_command_sees_what_the_server_gets(tmp_path):
    # "A pod that does not start": the commands show the policy the server would run with, and
    # --strict passes on the example's policy, as the init container's own check does.
    data = the("ConfigMap", "kvhygiene-policy")["data"]
    r = run_policy_script(tmp_path, data, kvh_binary())
    assert r.returncode == 0, r.stdout + r.stderr
    for k, v in data.items():
        assert v in r.stdout, f"{k}={v} not shown: {r.stdout}"
    digest = re.search(r"config digest: ([0-9a-f]{64})", r.stdout)
    assert digest, r.stdout
    server = container_kvh_env(server_container())
    assert digest.group(1) == digest_in(server), f"the runbook's policy vs the server's {server}"


def test_the_runbooks_policy_command_passes_a_value_with_a_space_whole(tmp_path):
    # A value holding a space (or a glob character) reaches `kvh config` whole, as the pod's
    # envFrom gives it.
    data = {"KVH_BACKEND": "host", "KVH_LOG_DIR": "/var/log/kvh/audit chains*"}
    printer = tmp_path / "print-env"
    printer.write_text("#!/bin/sh\nenv | grep '^KVH_'\n")
    printer.chmod(0o755)
    r = run_policy_script(tmp_path, data, str(printer))
    assert r.returncode == 0, r.stderr
    seen = dict(line.split("=", 1) for line in r.stdout.splitlines())
    for k, v in data.items():
        assert seen.get(k) == v, f"{k}: kvh config sees {seen.get(k)!r}, the pod {v!r}"


def test_the_runbooks_drift_command_runs_in_the_container_that_has_the_policy():
    # "Policy drift", step 2: `kubectl exec POD -c NAME -- PATH config` must name the container
    # whose environment the library starts with, and a path where the pod puts the image's kvh.
    m = re.search(r"`kubectl exec POD -c (\S+) -- (\S+) config`", runbook_text())
    assert m, "the runbook's kubectl exec command for kvh config was not found"
    name, path = m.groups()
    server = server_container()
    assert name == server["name"], f"the runbook runs kvh config in {name}, the library runs in {server['name']}"
    env = {e["name"]: e.get("value") for e in server.get("env", [])}
    assert "KVH_LIBRARY" in env or "LD_PRELOAD" in env, "the server container does not load the library"
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    (mount,) = [mp for mp in mounts if path.startswith(mp.rstrip("/") + "/")]
    assert mounts[mount] == "kvh-dist", f"{path} is on volume {mounts[mount]}, not the distribution"
    assert in_layout(path[len(mount) :].lstrip("/")), f"{path} is not in the distribution"
    # Elsewhere in the pod (the sidecars of the kvhygiene image) kvh config sees another policy,
    # which is why the runbook names the container.
    spec = dict(pod_specs())["deployment/inference-server"]
    sidecars = [c for _, c in containers(spec) if is_kvh_image(c["image"]) and c is not install_container(spec)]
    assert sidecars
    assert all(digest_in(container_kvh_env(c)) != digest_in(container_kvh_env(server)) for c in sidecars)


def tail_sidecar(spec: dict) -> dict:
    (c,) = [c for c in spec["initContainers"] if c["name"] == "kvh-tail"]
    return c


def test_tail_sidecar_is_native_and_its_start_up_probe_waits_for_its_state():
    spec = dict(pod_specs())["deployment/inference-server"]
    tail = tail_sidecar(spec)
    # Started before the server and stopped after it: a native sidecar, after the install.
    assert tail.get("restartPolicy") == "Always"
    assert spec["initContainers"].index(tail) > spec["initContainers"].index(install_container(spec))
    (argv,) = kvh_argvs(container_argv(tail))
    assert argv[0] == "tail-log" and "--once" not in argv, argv
    state = argv[argv.index("--state") + 1]
    assert tail["startupProbe"]["exec"]["command"] == ["test", "-f", state]
    assert all(e["name"] != "KVH_LOG_DIR" for e in server_container().get("env", []))
    log_dir = the("ConfigMap", "kvhygiene-policy")["data"]["KVH_LOG_DIR"]
    assert argv[1] == log_dir, "the tail reads the directory the server writes"
    mounts = {m["name"]: m for m in tail["volumeMounts"]}
    assert mounts["kvh-log"].get("readOnly") is True, "the tail cannot alter the evidence"
    # The state survives a restart of the container: not on its read-only root.
    assert any(state.startswith(m["mountPath"].rstrip("/") + "/") for m in tail["volumeMounts"] if not m.get("readOnly"))


ENGINE_DOUBLE_FREE = """
import ctypes
lib = ctypes.CDLL(None)
lib.kvh_malloc.restype = ctypes.c_void_p
lib.kvh_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
lib.kvh_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
lib.kvh_set_context(b"tenant-b", b"req-7", b"model")
p = lib.kvh_malloc(4096, 0, None)
assert p, "kvh_malloc failed"
lib.kvh_free(p, 4096, 0, None)
lib.kvh_free(p, 4096, 0, None)  # a double free: a security record
assert lib.kvh_synchronize() == 0
print("engine ok")
"""


def test_tail_sidecar_ships_the_servers_security_records_and_stops_after_a_last_pass(tmp_path):
    # The pod's order: install, then the tail (before the log directory exists), its start-up
    # probe, then the server; at the end the server exits first and the tail gets SIGTERM.
    files, label, spec = installed_pod(tmp_path)
    tail = tail_sidecar(spec)
    remap = files.mapper(label, spec, tail)
    env = files.env(tail, remap)
    probe = [remap(a) for a in tail["startupProbe"]["exec"]["command"]]
    err_path = tmp_path / "kvh-tail.stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [remap(a) for a in container_argv(tail)], env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        # Only bounds a failure: a loaded machine may take long to start the tail.
        deadline = time.monotonic() + 180
        while run_in(probe, env).returncode != 0:
            assert proc.poll() is None, f"the tail exited {proc.returncode}: {err_path.read_text()}"
            assert time.monotonic() < deadline, f"start-up probe never passed: {err_path.read_text()}"
            time.sleep(0.1)
        assert "does not exist yet" in err_path.read_text()

        server = server_container()
        server_remap = files.mapper(label, spec, server)
        engine = run_in(["python3", "-c", ENGINE_DOUBLE_FREE], {**files.env(server, server_remap), "KVH_BACKEND": "host"})
        assert engine.returncode == 0, f"{engine.stdout}{engine.stderr}"

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err_path.read_text()
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["kind"] for r in records] == ["invalid_free"], records
    assert (records[0]["tenant_id"], records[0]["request_id"]) == ("tenant-b", "req-7")


# The engine, serving on: once its metrics file holds a snapshot of its running allocator, it
# says so and waits for a line on stdin, then exits.
SERVING = """
import os, sys, time
path = os.environ["KVH_METRICS_FILE"]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        text = open(path).read()
    except OSError:
        text = ""
    if "\\nkvh_shut_down 0\\n" in text:
        break
    time.sleep(0.05)
else:
    sys.exit("no snapshot of the running allocator in " + path)
print("serving", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("probe", PROBES)
def test_probe_passes_against_the_exported_metrics(pod, probe):
    cmd = [pod["remap"](a) for a in pod["server"][probe]["exec"]["command"]]
    if cmd[1] not in kvh_verbs():
        pytest.fail(f"{probe}: `kvh {cmd[1]}` is not a verb of {kvh_binary()}")
    if probe != "readinessProbe":
        r = run_in(cmd, pod["env"])
        assert r.returncode == 0, f"{probe} {' '.join(cmd)} exited {r.returncode}: {r.stdout}{r.stderr}"
        return
    # Readiness judges a serving process: admitted while its engine runs, evicted once the
    # engine has exited (its last snapshot says the allocator shut down).
    live = subprocess.Popen(
        ["python3", "-c", ENGINE + SERVING],
        env={**pod["env"], "KVH_BACKEND": "host"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        said = [live.stdout.readline().strip(), live.stdout.readline().strip()]
        assert said == ["engine ok", "serving"], said
        r = run_in(cmd, pod["env"])
        assert r.returncode == 0, f"{probe} {' '.join(cmd)} exited {r.returncode}: {r.stdout}{r.stderr}"
    finally:
        out, err = live.communicate(input="\n", timeout=60)
    assert live.returncode == 0, out + err
    r = run_in(cmd, pod["env"])
    assert r.returncode == 1 and "shut down" in r.stdout, f"{probe} after the engine exited: {r.stdout}{r.stderr}"


def keyed_demo_log(log_dir: Path, hmac_key: Path, signing_key: Path):
    """A short `kvh demo` run writing its forensic log to `log_dir`, sealed with `hmac_key` and
    checkpointed with `signing_key`: one chain, as one process of the server would leave."""
    env = {
        "PATH": os.environ["PATH"],
        "KVH_HMAC_KEY_FILE": str(hmac_key),
        "KVH_SIGNING_KEY_FILE": str(signing_key),
    }
    argv = [kvh_binary(), "demo", "--backend", "host", "--tenants", "1", "--requests", "2"]
    r = run_in(argv + ["--decode-tokens", "16", "--log-dir", str(log_dir)], env)
    assert r.returncode == 0, f"kvh demo: {r.stdout}{r.stderr}"


def test_cronjob_verifies_chains_sealed_with_retired_keys(tmp_path):
    # The log holds a chain sealed before a key rotation and one after; the retired HMAC key
    # and public key are in the optional Secret of deploy/README.md's rotation steps.
    keys = tmp_path / "made-by-hand"
    keys.mkdir(mode=0o700)
    for era in ("old", "new"):
        (keys / f"{era}-hmac.key").write_text(secrets.token_hex(32) + "\n")
        (keys / f"{era}-hmac.key").chmod(0o600)
        r = subprocess.run([kvh_binary(), "keygen", "--out", str(keys / f"{era}-checkpoint")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    current = {
        "hmac.key": (keys / "new-hmac.key").read_bytes(),
        "checkpoint.pub": (keys / "new-checkpoint.pub").read_bytes(),
        "checkpoint.key": (keys / "new-checkpoint.key").read_bytes(),
    }
    retired = {
        "hmac-until-2026-11.key": (keys / "old-hmac.key").read_bytes(),
        "checkpoint-until-2026-11.pub": (keys / "old-checkpoint.pub").read_bytes(),
    }
    assert set(documented_secrets()["kvhygiene-forensic-keys"]) == set(current)
    label = "cronjob/kvhygiene-verify-log"
    spec = dict(pod_specs())[label]
    (c,) = spec["containers"]

    def run_cronjob(root: Path, data: dict):
        files = PodFiles(root, data)
        remap = files.mapper(label, spec, c)
        log = Path(remap("/var/log/kvh/chains"))
        if not log.exists():
            log.mkdir(parents=True, mode=0o700)
            keyed_demo_log(log, keys / "old-hmac.key", keys / "old-checkpoint.key")
            keyed_demo_log(log, keys / "new-hmac.key", keys / "new-checkpoint.key")
        return run_in([remap(a) for a in container_argv(c)], files.env(c, remap))

    # Without the retired keys the old chain fails: a finding, exit 1.
    r = run_cronjob(tmp_path / "before", {"kvhygiene-forensic-keys": current})
    assert r.returncode == 1, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    assert "MAC mismatch" in r.stdout, r.stdout
    # With them, both chains verify, each with its own key, and the report says which.
    data = {"kvhygiene-forensic-keys": current, "kvhygiene-forensic-keys-retired": retired}
    r = run_cronjob(tmp_path / "after", data)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    assert r.stdout.count("checkpoint at seq") == 2, r.stdout
    for name in ("hmac.key", "hmac-until-2026-11.key"):
        assert re.search(rf"MACs verified with \S*/{re.escape(name)}", r.stdout), r.stdout
        assert re.search(rf"- Sealed with \S*/{re.escape(name)}: 1 chain,", r.stdout), r.stdout


def test_retention_job_moves_old_files_and_the_verification_still_passes(tmp_path):
    # The weekly prune-log job, then the nightly verification, on one log volume: what the
    # job moves is accounted for by its manifests, and the chains left verify.
    keys = tmp_path / "made-by-hand"
    keys.mkdir(mode=0o700)
    (keys / "hmac.key").write_text(secrets.token_hex(32) + "\n")
    (keys / "hmac.key").chmod(0o600)
    r = subprocess.run([kvh_binary(), "keygen", "--out", str(keys / "checkpoint")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = {"kvhygiene-forensic-keys": {k: (keys / k).read_bytes() for k in ("hmac.key", "checkpoint.key", "checkpoint.pub")}}
    files = PodFiles(tmp_path / "pod", data)

    def job(label: str, days=None):
        spec = dict(pod_specs())[label]
        (c,) = spec["containers"]
        remap = files.mapper(label, spec, c)
        env = files.env(c, remap)
        if days is not None:
            env["RETENTION_DAYS"] = days
        return remap, run_in([remap(a) for a in container_argv(c)], env)

    prune, verify = "cronjob/kvhygiene-prune-log", "cronjob/kvhygiene-verify-log"
    remap, _ = job(verify)  # lays out the volumes; the log is written as the server would
    log = Path(remap("/var/log/kvh/chains"))
    log.mkdir(parents=True, mode=0o700)
    keyed_demo_log(log, keys / "hmac.key", keys / "checkpoint.key")
    before = sorted(p.name for p in log.glob("kvh-*.jsonl"))

    # The example's 30 days: nothing is that old yet.
    remap, r = job(prune)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    assert "moved 0 files" in r.stdout, r.stdout
    assert sorted(p.name for p in log.glob("kvh-*.jsonl")) == before
    # With 0 days, the ended chain moves whole to the archive volume, its manifest stays.
    remap, r = job(prune, days="0")
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    archive = Path(remap("/var/lib/kvh-archive/chains"))
    assert stat.S_IMODE(archive.stat().st_mode) == 0o700
    assert sorted(p.name for p in archive.glob("kvh-*.jsonl")) == before, r.stdout
    assert not list(log.glob("kvh-*.jsonl")) and list(log.glob("kvh-*.pruned.json")), r.stdout

    # A later process writes a chain; the nightly verification accepts the pruned one.
    keyed_demo_log(log, keys / "hmac.key", keys / "checkpoint.key")
    _, r = job(verify)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    assert "moved to" in r.stdout and "by prune-log" in r.stdout, r.stdout
    # Removing the manifest is caught: the moved chain's signed checkpoint, still in the log
    # directory, names a chain of which nothing is accounted for.
    for m in log.glob("kvh-*.pruned.json"):
        m.unlink()
    _, r = job(verify)
    assert r.returncode == 1, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    assert "files deleted" in r.stdout, r.stdout


def pruned_log(tmp_path: Path) -> tuple:
    """A log volume as the example leaves it once the retention job has run: one chain moved
    whole to the archive by the prune CronJob (its manifest and checkpoint stay), then a later
    process's chain. Returns (log directory, keys directory)."""
    keys = tmp_path / "made-by-hand"
    keys.mkdir(mode=0o700)
    (keys / "hmac.key").write_text(secrets.token_hex(32) + "\n")
    (keys / "hmac.key").chmod(0o600)
    r = subprocess.run([kvh_binary(), "keygen", "--out", str(keys / "checkpoint")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = {"kvhygiene-forensic-keys": {k: (keys / k).read_bytes() for k in ("hmac.key", "checkpoint.key", "checkpoint.pub")}}
    files = PodFiles(tmp_path / "pod", data)
    label = "cronjob/kvhygiene-prune-log"
    spec = dict(pod_specs())[label]
    (c,) = spec["containers"]
    remap = files.mapper(label, spec, c)
    log = Path(remap("/var/log/kvh/chains"))
    log.mkdir(parents=True, mode=0o700)
    keyed_demo_log(log, keys / "hmac.key", keys / "checkpoint.key")
    r = run_in([remap(a) for a in container_argv(c)], {**files.env(c, remap), "RETENTION_DAYS": "0"})
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    assert list(log.glob("kvh-*.pruned.json")), r.stdout
    keyed_demo_log(log, keys / "hmac.key", keys / "checkpoint.key")
    return log, keys


def runbook_incident_command(verb: str) -> list:
    """The `kvh VERB ...` command of the runbook's "During an incident" steps, as argv."""
    section = runbook_text().split("## During an incident", 1)[1].split("## ", 1)[0]
    m = re.search(rf"`(kvh {verb} [^`]*)`", section)
    assert m, f"no `kvh {verb}` command in the runbook's incident steps"
    return shlex.split(m.group(1).split(">", 1)[0])


def test_the_runbooks_incident_verification_passes_on_a_log_the_retention_job_pruned(tmp_path):
    # "During an incident", step 2: the runbook's verify-log command reads exit 1 as tampering
    # ("escalate as a security incident"). On an intact log whose old chains the shipped
    # retention job moved to the archive, the command is expected to exit 0.
    log, keys = pruned_log(tmp_path)
    subst = {"DIR": str(log), "KEY": str(keys / "hmac.key"), "PUB": str(keys / "checkpoint.pub"), "CKPT": str(log)}
    argv = [subst.get(a, a) for a in runbook_incident_command("verify-log")]
    r = run_in([kvh_binary(), *argv[1:]], {"PATH": os.environ["PATH"]})
    assert r.returncode == 0, (
        f"the runbook's `{' '.join(runbook_incident_command('verify-log'))}` exited {r.returncode} "
        f"on an intact log pruned by the retention job: {r.stdout}{r.stderr}"
    )


def test_the_runbooks_incident_report_accounts_for_chains_the_retention_job_moved(tmp_path):
    # "During an incident", step 3: the runbook's evidence command "lists every exception". On
    # a log whose old chains the retention job moved, the report is expected to say that those
    # chains' records are elsewhere (in the archive), rather than present the chains left as
    # the whole log.
    log, keys = pruned_log(tmp_path)
    subst = {"DIR": str(log), "KEY": str(keys / "hmac.key"), "PUB": str(keys / "checkpoint.pub"), "CKPT": str(log)}
    argv = [subst.get(a, a) for a in runbook_incident_command("evidence")]
    r = run_in([kvh_binary(), *argv[1:]], {"PATH": os.environ["PATH"]})
    (moved,) = [m.name.split(".")[0][len("kvh-"):] for m in log.glob("kvh-*.pruned.json")]
    assert r.returncode == 0 and moved in r.stdout, (
        f"`{' '.join(argv)}` exited {r.returncode} with a report that never names chain {moved}, "
        f"whose records the retention job moved to the archive:\n{r.stdout[:1500]}"
    )


def test_verify_log_without_allow_pruned_does_not_pass_a_log_whose_chains_were_moved(tmp_path):
    # verify-log --help: "Without [--allow-pruned], missing files fail the chain". A log whose
    # manifests say a chain's files were all moved away is expected to fail without
    # --allow-pruned (exit 1), naming that chain and the options that account for it.
    log, keys = pruned_log(tmp_path)
    (moved,) = [m.name.split(".")[0][len("kvh-"):] for m in log.glob("kvh-*.pruned.json")]
    r = run_in([kvh_binary(), "verify-log", str(log), "--key-file", str(keys / "hmac.key")], {"PATH": os.environ["PATH"]})
    assert r.returncode == 1 and moved in r.stdout + r.stderr and "--allow-pruned" in r.stdout + r.stderr, (
        f"verify-log without --allow-pruned exited {r.returncode} and never named chain {moved}, "
        f"whose files are missing: {r.stdout}{r.stderr}"
    )


# A kubectl standing in for the cluster's Secrets: `create secret generic` (from files, or
# printed with --dry-run=client -o yaml), `replace -f -`, `get secret -o jsonpath`, `patch
# --type=merge --patch-file`; anything else succeeds doing nothing. Secrets live in $SECRETS.
KUBECTL_STUB = r"""#!/usr/bin/env python3
import base64, json, os, re, sys
store_path = os.environ["SECRETS"]
store = json.load(open(store_path)) if os.path.exists(store_path) else {}
args = sys.argv[1:]
def save():
    json.dump(store, open(store_path, "w"))
if args[:3] == ["create", "secret", "generic"]:
    name, data = args[3], {}
    for a in args[4:]:
        if a.startswith("--from-file="):
            f = a.split("=", 1)[1]
            key, path = f.split("=", 1) if "=" in f else (os.path.basename(f), f)
            if not os.path.isfile(path):
                sys.exit(f"error: error reading {path}: no such file or directory")
            data[key] = base64.b64encode(open(path, "rb").read()).decode()
    if "--dry-run=client" in args:
        print(json.dumps({"kind": "Secret", "metadata": {"name": name}, "data": data}))
    else:
        store[name] = data
        save()
elif args[:2] == ["replace", "-f"]:
    text = sys.stdin.read()
    if not text.strip():
        sys.exit("error: no objects passed to replace")
    obj = json.loads(text)
    store[obj["metadata"]["name"]] = obj["data"]
    save()
elif args[:2] == ["get", "secret"]:
    path = re.match(r"jsonpath=\{\.data\.(.*)\}", args[args.index("-o") + 1]).group(1).replace("\\.", ".")
    sys.stdout.write(store[args[2]][path])
elif args[:2] == ["patch", "secret"]:
    patch = [a for a in args if a.startswith("--patch-file=")][0].split("=", 1)[1]
    store[args[2]].update(json.load(open(patch))["data"])
    save()
"""


def test_the_readmes_key_rotation_replaces_the_signing_key(tmp_path):
    # deploy/README.md: the keys are created (keeping checkpoint.pub, "verifiers need it"),
    # then rotated with the "Rotating the keys" commands, typed in the same shell and
    # directory. After the rotation the current Secret is expected to hold a new signing key,
    # and the old private key to be in no Secret (as the README says it then is).
    text = DEPLOY_README.read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    (create,) = [b for b in blocks if "kvh keygen --out checkpoint" in b and "kvhygiene-forensic-keys-retired" not in b]
    (rotate,) = [b for b in blocks if "kvhygiene-forensic-keys-retired" in b]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(KUBECTL_STUB)
    (bin_dir / "kubectl").chmod(0o755)
    (bin_dir / "kvh").symlink_to(kvh_binary())
    work = tmp_path / "work"
    work.mkdir()
    store = tmp_path / "secrets.json"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SECRETS": str(store), "HOME": str(tmp_path)}
    r = run_in(["bash", "-c", create], env, cwd=work)
    assert r.returncode == 0, f"the key creation commands failed: {r.stdout}{r.stderr}"
    before = json.loads(store.read_text())["kvhygiene-forensic-keys"]
    r = run_in(["bash", "-c", rotate], env, cwd=work)
    after = json.loads(store.read_text())
    assert after["kvhygiene-forensic-keys"]["checkpoint.key"] != before["checkpoint.key"], (
        "after the README's rotation the Secret still holds the old private signing key "
        f"(the one now listed as retired):\n{r.stderr}"
    )


def test_cronjob_verifies_the_log_and_fails_on_tampering(pod):
    label = "cronjob/kvhygiene-verify-log"
    spec = dict(pod_specs())[label]
    (c,) = spec["containers"]
    files = pod["files"]
    remap = files.mapper(label, spec, c)
    cmd = [remap(a) for a in container_argv(c)]
    env = files.env(c, remap)
    r = run_in(cmd, env)
    assert r.returncode == 0, f"the CronJob's script exited {r.returncode}: {r.stdout}{r.stderr}"
    assert "MACs verified" in r.stdout and "checkpoint at seq" in r.stdout, r.stdout
    assert "# kvhygiene evidence report" in r.stdout, r.stdout

    # Change one record (its time stamp): exit 1, the bad record named.
    log = sorted(Path(pod["env"]["KVH_LOG_DIR"]).glob("kvh-*.jsonl"))[0]
    text = log.read_text()
    tampered = re.sub(r'"ts":(\d)', lambda m: '"ts":' + str((int(m.group(1)) + 1) % 10), text, count=1)
    assert tampered != text
    log.write_text(tampered)
    r = run_in(cmd, env)
    assert r.returncode == 1, f"a tampered log gave exit {r.returncode}: {r.stdout}{r.stderr}"
    assert log.name in r.stdout + r.stderr

    # No log at all: the check could not be made, exit 2.
    shutil.rmtree(Path(pod["env"]["KVH_LOG_DIR"]))
    r = run_in(cmd, env)
    assert r.returncode == 2, f"a missing log gave exit {r.returncode}: {r.stdout}{r.stderr}"


# ---------------------------------------------------------------------------------------------
# The Prometheus Operator's objects (deploy/prometheus-operator)

OPERATOR = DEPLOY / "prometheus-operator"
RULES_FILE = DEPLOY / "prometheus" / "kvhygiene-rules.yaml"


#: Each PrometheusRule of deploy/prometheus-operator, its name and the rules file it holds.
PROMETHEUS_RULES = [
    ("prometheusrule.yaml", "kvhygiene", RULES_FILE),
    ("prometheusrule-k8s.yaml", "kvhygiene-deployment", DEPLOY / "prometheus" / "kvhygiene-k8s-rules.yaml"),
]


def prometheusrule_text(name: str, rules_file) -> str:
    """A PrometheusRule of deploy/prometheus-operator as it must be: the rules file's groups,
    unchanged, under its spec."""
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "inference-server", "app.kubernetes.io/component": "kvh-metrics"},
        },
        "spec": {"groups": yaml.safe_load(rules_file.read_text())["groups"]},
    }
    shown = rules_file.relative_to(ROOT)
    header = (
        f"# The alerting rules of {shown} (read its comments there) as a\n"
        "# PrometheusRule for the Prometheus Operator. Generated; do not edit: change the rules file,\n"
        "# then `KVH_BLESS=1 python3 -m pytest tests/python/test_deploy.py -k prometheusrule`.\n"
        "# A Prometheus whose ruleSelector asks for a label (kube-prometheus-stack's\n"
        "# `release: NAME`) needs it added under metadata.labels.\n"
    )
    return header + yaml.safe_dump(rule, sort_keys=False, width=4096, allow_unicode=True)


@pytest.mark.parametrize("file, name, rules_file", PROMETHEUS_RULES)
def test_the_prometheusrule_holds_the_rules_files_groups(file, name, rules_file):
    path = OPERATOR / file
    want = prometheusrule_text(name, rules_file)
    if os.environ.get("KVH_BLESS"):
        path.write_text(want)
    got = path.read_text() if path.exists() else ""
    assert got == want, (
        f"{path.relative_to(ROOT)} is not {rules_file.relative_to(ROOT)}'s groups: "
        "regenerate it with `KVH_BLESS=1 python3 -m pytest tests/python/test_deploy.py -k prometheusrule`"
    )
    (rule,) = load_yaml(path)
    assert rule["spec"]["groups"] == yaml.safe_load(rules_file.read_text())["groups"]


def test_the_servicemonitor_scrapes_the_metrics_service():
    kustomization = load_yaml(OPERATOR / "kustomization.yaml")[0]
    files = sorted(p.name for p in OPERATOR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    (monitor,) = load_yaml(OPERATOR / "servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"
    svc = the("Service", "inference-server-kvh-metrics")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= svc["metadata"]["labels"].items(), f"{wanted} selects no label set of the Service"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    annotations = the("Deployment", "inference-server")["spec"]["template"]["metadata"]["annotations"]
    assert endpoint["path"] == annotations["prometheus.io/path"]
    # KvhMetricsStale fires at 120 s: several scrapes must fit in it.
    assert int(endpoint["interval"].rstrip("s")) <= 60


def test_the_pods_grace_period_covers_the_tails_last_pass_over_a_full_log_volume():
    # deploy/README.md: at the pod's end the kvh-tail sidecar "gets SIGTERM after the server
    # exited, makes a last pass over what the server wrote while it shut down, and exits 0".
    # Kubernetes gives the server's shutdown and the sidecar's last pass together one
    # terminationGracePeriodSeconds (default 30), then kills both. A pass verifies the whole
    # log directory; the Deployment's own comment puts that at about 300 MB/s on one core
    # ("a minute for 20 GiB"), and the log volume is sized to be filled (pvc.yaml). The grace
    # period is expected to cover a last pass over a log as large as its volume.
    spec = dict(pod_specs())["deployment/inference-server"]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    size = the("PersistentVolumeClaim", "kvhygiene-forensic-log")["spec"]["resources"]["requests"]["storage"]
    m = re.fullmatch(r"(\d+)Gi", size)
    assert m, size
    pass_seconds = int(m.group(1)) * 2**30 / 300e6
    # kvh-tail is a native sidecar: its SIGTERM comes once the regular containers exited,
    # kvh-metrics among them, whose preStop hook may take its whole bound first.
    side = next(c for c in spec["containers"] if c["name"] == "kvh-metrics")
    hook = side["lifecycle"]["preStop"]["exec"]["command"][-1]
    bounds = re.search(r'-ge (\d+) \].*sleep (\d+)$', hook)
    assert bounds, hook
    pre_stop = int(bounds.group(1)) + int(bounds.group(2))
    assert grace >= pre_stop + pass_seconds, (
        f"terminationGracePeriodSeconds {grace} s < the metrics sidecar's preStop ({pre_stop} s) "
        f"and the tail's last pass over the {size} log volume ({pass_seconds:.0f} s), one after "
        "the other"
    )


def test_check_release_refuses_a_committed_ptx_build_when_a_kernel_build_is_required(tmp_path):
    # CI builds the release with the pinned kernel toolchain (KVHYGIENE_REQUIRE_KERNEL_BUILD=1):
    # a distribution whose BUILD-INFO says its kernels are the committed PTX is then refused.
    dist = assemble_distribution(tmp_path / "dist")
    env = {**os.environ, "KVHYGIENE_REQUIRE_KERNEL_BUILD": "1"}
    r = subprocess.run(
        [str(ROOT / "scripts/check-release.sh"), str(dist)], capture_output=True, text=True, timeout=600, env=env
    )
    assert r.returncode != 0 and "committed PTX" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# What on-call meets: alert links, the signals the library cannot export, the evidence volumes


K8S_RULES_FILE = DEPLOY / "prometheus" / "kvhygiene-k8s-rules.yaml"


def alert_rules(path=RULES_FILE) -> list:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_the_documented_rewrite_makes_every_runbook_url_open_from_an_alert(tmp_path):
    # Alertmanager, Grafana, Slack and PagerDuty show runbook_url as it is: the shipped
    # "docs/operations.md#..." is relative to the repository. deploy/README.md gives the sed
    # that points it at a copy of the documentation; run as written, it must reach every alert
    # of the rules files and of the PrometheusRules, and leave them valid YAML.
    readme = " ".join(DEPLOY_README.read_text().split())
    m = re.search(r"`(sed -i -E '[^']+')`", readme)
    assert m, "deploy/README.md shows no runbook_url rewrite"
    files = [RULES_FILE, K8S_RULES_FILE, *sorted(OPERATOR.glob("prometheusrule*.yaml"))]
    assert len(files) == 4, files
    for path in files:
        copy = tmp_path / path.name
        copy.write_text(path.read_text())
        run = subprocess.run(["sh", "-c", f'{m.group(1)} "$0"', str(copy)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        doc = yaml.safe_load(copy.read_text())
        groups = doc["spec"]["groups"] if "spec" in doc else doc["groups"]
        urls = [r["annotations"]["runbook_url"] for g in groups for r in g["rules"] if "alert" in r]
        assert urls and all(u.startswith("https://docs.example.com/kvhygiene/docs/operations.md#") for u in urls), (
            path.name,
            urls,
        )


def test_the_shipped_rules_alert_on_the_log_checks_the_docs_route_incidents_to():
    # deploy/README.md: "alert on failed Jobs" (verify-log, prune-log) and "alert on that line,
    # or on the container's restarts" (kvh-tail); a pod held at its init container has no
    # metrics for the library's rules to see.
    exprs = " ".join(a["expr"] for a in alert_rules(RULES_FILE) + alert_rules(K8S_RULES_FILE))
    missing = [w for w in ("verify|prune", "kvh-tail", "kvhygiene-install") if w not in exprs]
    assert not missing, f"no shipped alert watches: {missing}"


def test_a_failing_native_sidecar_taking_the_pod_out_of_rotation_is_documented():
    # The kubelet counts a restartable init container in the pod's ContainersReady/Ready
    # conditions: while kvh-tail exits 1 (tampering), 2 (I/O error) or is OOM-killed and sits in
    # CrashLoopBackOff, the pod is NotReady and leaves the Service (replicas: 1: an outage), even
    # though `kvh gate`, the documented readiness probe, admits. The runbook's tampering section
    # and the README's probe table say nothing of it.
    spec = dict(pod_specs())["deployment/inference-server"]
    sidecars = [c["name"] for c in spec["initContainers"] if c.get("restartPolicy") == "Always"]
    assert sidecars == ["kvh-tail"]
    text = runbook_text()
    section = text[text.index("## The log shipper reports tampering") : text.index("## During an incident")]
    assert re.search(r"not ready|NotReady|unready|out of rotation|readiness", section), section


def test_deleting_the_kustomization_does_not_destroy_the_evidence():
    # pvc.yaml: the archive is "kept as long as the evidence must be ... Nothing deletes them".
    # Both PVCs are resources of the kustomization, so `kubectl delete -k deploy/k8s` (or the
    # namespace's deletion) deletes them, and with the usual default StorageClass
    # (reclaimPolicy: Delete) their volumes and the evidence go with them. Nothing here pins a
    # Retain class or protects the claims.
    text = (K8S / "pvc.yaml").read_text() + DEPLOY_README.read_text()
    for name in ("kvhygiene-forensic-log", "kvhygiene-forensic-archive"):
        pvc = the("PersistentVolumeClaim", name)
        assert pvc["spec"].get("storageClassName") or re.search(r"reclaimPolicy|Retain", text), (
            f"{name}: deleted with the kustomization, its volume with it under reclaimPolicy Delete"
        )


def test_the_metrics_sidecar_serves_the_servers_last_snapshot_before_it_stops(tmp_path):
    # At the pod's end the sidecar would stop with the server, before the snapshot the server
    # writes as it shuts down (kvh_shut_down 1) could be scraped. Its preStop waits for that
    # snapshot, bounded, then one scrape interval, all within the pod's grace period. Run here
    # with a `sleep` that records what it was asked and returns at once.
    spec = dict(pod_specs())["deployment/inference-server"]
    side = next(c for c in spec["containers"] if c["name"] == "kvh-metrics")
    argv = side["lifecycle"]["preStop"]["exec"]["command"]
    file = side["args"][side["args"].index("--file") + 1]
    assert file in argv[-1], argv
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slept = tmp_path / "slept"
    (bin_dir / "sleep").write_text(f"#!/bin/sh\necho \"$1\" >> '{slept}'\n")
    (bin_dir / "sleep").chmod(0o755)
    snapshot = tmp_path / "kvh.prom"
    script = argv[-1].replace(file, str(snapshot))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def stop(text):
        snapshot.write_text(text)
        slept.unlink(missing_ok=True)
        subprocess.run([argv[0], argv[1], script], env=env, check=True, timeout=30)
        return slept.read_text().split()

    # The last snapshot is there: one scrape interval, no more.
    assert stop("kvh_snapshot_timestamp_seconds 1\nkvh_shut_down 1\n") == ["35"]
    # A per-process file's line carries the process's label.
    assert stop('kvh_snapshot_timestamp_seconds{pid="12"} 1\nkvh_shut_down{pid="12"} 1\n') == ["35"]
    # The server never writes it (killed): the wait ends, bounded, then the same interval.
    waited = stop("kvh_snapshot_timestamp_seconds 1\nkvh_shut_down 0\n")
    assert waited[-1] == "35" and len(waited) - 1 == 120, waited[:3]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    assert 120 + 35 < grace, grace
    (monitor,) = load_yaml(OPERATOR / "servicemonitor.yaml")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert int(endpoint["interval"].rstrip("s")) < 35, endpoint
