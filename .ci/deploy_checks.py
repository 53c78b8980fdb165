"""Consistency checks for deploy/ that schema validation cannot see.

Run by .ci/validate-deploy with the CI venv's Python (PyYAML comes with
kubernetes-validate). Usage: deploy_checks.py REPO_ROOT OUT_DIR
Writes OUT_DIR/k8s-config.toml (the ConfigMap's config, for check-config)
and OUT_DIR/socket-path. Prints one line per problem and exits 1 if any.
"""

import pathlib
import re
import sys
import tomllib

import yaml

root = pathlib.Path(sys.argv[1])
out = pathlib.Path(sys.argv[2])
k8s = root / "deploy/kubernetes"
problems = []


def check(ok, message):
    if not ok:
        problems.append(message)
    return ok


def load(name):
    docs = [d for d in yaml.safe_load_all((k8s / name).read_text()) if d]
    if len(docs) != 1:
        raise SystemExit(f"{name}: expected one document, found {len(docs)}")
    return docs[0]


# Quantities as Kubernetes parses them (the schema accepts any string).
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")

# kustomization: every manifest is either applied or a documented template.
TEMPLATES = {
    "secret-example.yaml",
    "client-example.yaml",
    "token-file-client-example.yaml",
    "metadata-client-example.yaml",
}
kust = load("kustomization.yaml")
resources = kust.get("resources", [])
for r in resources:
    check((k8s / r).is_file(), f"kustomization.yaml: resource {r} does not exist")
for f in sorted(p.name for p in k8s.glob("*.yaml")):
    if f != "kustomization.yaml":
        check(
            f in resources or f in TEMPLATES,
            f"{f} is neither in kustomization.yaml resources nor a known template",
        )
for t in TEMPLATES:
    check(t not in resources, f"kustomization.yaml must not apply the template {t}")

# The ConfigMap's config.toml.
cm = load("configmap.yaml")
config_text = cm["data"]["config.toml"]
config = tomllib.loads(config_text)
socket_path = config.get("server", {}).get("socket_path")
check(socket_path, "configmap.yaml: config.toml must set server.socket_path")
socket_path = socket_path or "/run/token-broker/broker.sock"
socket_dir = str(pathlib.PurePosixPath(socket_path).parent)
(out / "k8s-config.toml").write_text(config_text)
(out / "socket-path").write_text(socket_path)

# The DaemonSet.
ds = load("daemonset.yaml")
pod = ds["spec"]["template"]["spec"]
check(pod.get("hostNetwork") is False, "daemonset: hostNetwork must be false")
check(pod.get("terminationGracePeriodSeconds", 30) >= 15,
      "daemonset: terminationGracePeriodSeconds must cover the 10 s drain (>= 15)")
check("maxSurge" not in ds["spec"].get("updateStrategy", {}).get("rollingUpdate", {}),
      "daemonset: maxSurge would start two brokers on one socket path")
psc = pod.get("securityContext", {})
uid, gid = psc.get("runAsUser"), psc.get("runAsGroup")
check(isinstance(uid, int) and uid > 0, "daemonset: pod runAsUser must be a non-root uid")
check(isinstance(gid, int) and gid > 0, "daemonset: pod runAsGroup must be a non-root gid")
check("fsGroup" not in psc, "daemonset: fsGroup would make the key file group-readable")
check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
      "daemonset: seccompProfile must be RuntimeDefault")

check(pod.get("hostPID") is False, "daemonset: hostPID must be false (the host's /proc is mounted instead)")
kube = config.get("kubernetes")
volumes = {v["name"]: v for v in pod["volumes"]}
host_dirs = {n: v["hostPath"]["path"] for n, v in volumes.items() if "hostPath" in v}
allowed_host_dirs = [socket_dir] + (["/proc"] if kube is not None else [])
check(sorted(host_dirs.values()) == sorted(allowed_host_dirs),
      f"daemonset: the hostPaths must be exactly {allowed_host_dirs}, got {host_dirs}")
for n, v in volumes.items():
    if "hostPath" in v and v["hostPath"]["path"] == socket_dir:
        check(v["hostPath"].get("type") == "DirectoryOrCreate",
              "daemonset: the socket hostPath must be type DirectoryOrCreate")
    if "hostPath" in v and v["hostPath"]["path"] == "/proc":
        check(v["hostPath"].get("type") == "Directory",
              "daemonset: the host /proc hostPath must be type Directory")
    if "secret" in v:
        check(v["secret"].get("optional") is True, f"daemonset: secret volume {n} must be optional")
        check(v["secret"].get("defaultMode") == 0o400, f"daemonset: secret volume {n} must be 0400")

containers = pod["containers"]
init = pod.get("initContainers", [])
main = next((c for c in containers if c["name"] == "token-broker"), None)
if check(main is not None, "daemonset: no container named token-broker"):
    csc = main.get("securityContext", {})
    check(csc.get("runAsNonRoot") is True, "daemonset: token-broker must set runAsNonRoot")
    check(csc.get("readOnlyRootFilesystem") is True, "daemonset: readOnlyRootFilesystem")
    check(csc.get("allowPrivilegeEscalation") is False, "daemonset: allowPrivilegeEscalation")
    check(csc.get("capabilities", {}).get("drop") == ["ALL"], "daemonset: capabilities drop ALL")
    check(not csc.get("capabilities", {}).get("add"), "daemonset: token-broker adds no capability")
    check("runAsUser" not in csc or csc["runAsUser"] == uid, "daemonset: container runAsUser differs")
    probe_cmd = ["token-broker", "health", "--socket", socket_path]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = main.get(probe, {}).get("exec", {}).get("command")
        check(cmd == probe_cmd, f"daemonset: {probe} must exec {' '.join(probe_cmd)}, got {cmd}")
    mounts = {m["name"]: m["mountPath"] for m in main.get("volumeMounts", [])}
    socket_mounts = [n for n in mounts if n in host_dirs]
    check(socket_mounts and mounts[socket_mounts[0]] == socket_dir,
          f"daemonset: the socket directory must be mounted at {socket_dir}")
    check(any(p == "/etc/token-broker" for p in mounts.values()),
          "daemonset: the ConfigMap must be mounted at /etc/token-broker")
    check(main.get("args", [])[:3] == ["serve", "--config", "/etc/token-broker/config.toml"],
          "daemonset: args must be serve --config /etc/token-broker/config.toml")
    mounts_full = {m["name"]: m for m in main.get("volumeMounts", [])}
    if kube is not None:
        # [kubernetes]: the kubelet by NODE_NAME, the host's /proc where
        # proc_root says, read-only, and the projected token and CA where
        # token_file and ca_file say.
        env = {e["name"]: e for e in main.get("env", [])}
        if "kubelet_url" not in kube:
            node = env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {})
            check(node.get("fieldPath") == "spec.nodeName",
                  "daemonset: NODE_NAME must come from the downward API (fieldPath: spec.nodeName)")
        proc_root = kube.get("proc_root", "/proc")
        proc_mounts = [m for n, m in mounts_full.items() if host_dirs.get(n) == "/proc"]
        check(len(proc_mounts) == 1 and proc_mounts[0]["mountPath"] == proc_root
              and proc_mounts[0].get("readOnly") is True,
              f"daemonset: the host's /proc must be mounted read-only at proc_root {proc_root}")
        sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
        token_file = kube.get("token_file", f"{sa_dir}/token")
        ca_file = kube.get("ca_file", f"{sa_dir}/ca.crt")
        projected = {n: v["projected"] for n, v in volumes.items() if "projected" in v}
        found = False
        for n, proj in projected.items():
            paths = []
            for source in proj.get("sources", []):
                if "serviceAccountToken" in source:
                    paths.append(("token", source["serviceAccountToken"]["path"]))
                for item in source.get("configMap", {}).get("items", []):
                    paths.append(("ca", item["path"]))
            m = mounts_full.get(n)
            if m and m.get("readOnly") is True:
                files = {kind: f'{m["mountPath"]}/{path}' for kind, path in paths}
                found = found or (files.get("token") == token_file and files.get("ca") == ca_file)
        check(found, f"daemonset: a projected volume must put the token at {token_file} and the CA at {ca_file}")
        check(pod.get("serviceAccountName") == "token-broker",
              "daemonset: serviceAccountName must be token-broker (the RBAC subject)")
    image = main["image"].rsplit(":", 1)[0]
    check(any(i.get("name") == image for i in kust.get("images", [])),
          f"kustomization.yaml: images must rewrite the DaemonSet's image {image}")
for c in containers + init:
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        check(res.get(kind, {}).keys() >= {"cpu", "memory"},
              f"daemonset: {c['name']} needs {kind} for cpu and memory")
        for k, q in res.get(kind, {}).items():
            check(QUANTITY.match(str(q)), f"daemonset: {c['name']} {kind}.{k} = {q!r} is not a quantity")
for c in init:
    script = " ".join(c.get("command", []) + c.get("args", []))
    check(f"chown {uid}:{gid} {socket_dir}" in script,
          f"daemonset: init container {c['name']} must chown {socket_dir} to {uid}:{gid}")
    check(c["securityContext"].get("capabilities", {}).get("add") == ["CHOWN"],
          f"daemonset: init container {c['name']} may add CHOWN only")

# RBAC: exactly what the pod lookup needs, bound to the DaemonSet's account.
if kube is not None:
    role = load("clusterrole.yaml")
    rules = sorted((tuple(r.get("apiGroups", [])), tuple(r.get("resources", [])), tuple(r.get("verbs", [])))
                   for r in role.get("rules", []))
    check(rules == [(("",), ("nodes/proxy",), ("get",)), (("",), ("serviceaccounts",), ("get",))],
          f"clusterrole.yaml: rules must be exactly nodes/proxy get and serviceaccounts get, got {rules}")
    binding = load("clusterrolebinding.yaml")
    check(binding.get("roleRef", {}).get("name") == role["metadata"]["name"]
          and binding["roleRef"].get("kind") == "ClusterRole",
          "clusterrolebinding.yaml: roleRef must be the ClusterRole token-broker")
    subjects = [(s.get("kind"), s.get("name"), s.get("namespace")) for s in binding.get("subjects", [])]
    check(subjects == [("ServiceAccount", pod.get("serviceAccountName"), ds["metadata"]["namespace"])],
          f"clusterrolebinding.yaml: the one subject must be the DaemonSet's service account, got {subjects}")

# The client example.
client = load("client-example.yaml")
cpod = client["spec"]["template"]["spec"]
check(gid in cpod.get("securityContext", {}).get("supplementalGroups", []),
      f"client-example: supplementalGroups must contain the broker's gid {gid}")
chost = {v["name"]: v["hostPath"]["path"] for v in cpod["volumes"] if "hostPath" in v}
check(list(chost.values()) == [socket_dir], f"client-example: must mount hostPath {socket_dir}")
for c in cpod["containers"]:
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    check(env.get("TOKEN_BROKER_SOCKET") == socket_path,
          f"client-example: {c['name']} must set TOKEN_BROKER_SOCKET={socket_path}")
    for m in c.get("volumeMounts", []):
        if m["name"] in chost:
            check(m.get("readOnly") is True and m["mountPath"] == socket_dir,
                  f"client-example: mount {socket_dir} read-only at the same path")

# The token-file example mounts the sink directory the init container
# prepares, read-only, and nothing else from the host.
files_dir = f"{socket_dir}/files"
for c in init:
    script = " ".join(c.get("command", []) + c.get("args", []))
    check(f"chown {uid}:{gid} {files_dir}" in script and f"chmod 0711 {files_dir}" in script,
          f"daemonset: init container {c['name']} must prepare {files_dir} (0711, {uid}:{gid})")
tfc = load("token-file-client-example.yaml")
tpod = tfc["spec"]["template"]["spec"]
thost = {v["name"]: v["hostPath"]["path"] for v in tpod["volumes"] if "hostPath" in v}
check(list(thost.values()) == [files_dir],
      f"token-file-client-example: must mount hostPath {files_dir} only")
for c in tpod["containers"]:
    for m in c.get("volumeMounts", []):
        if m["name"] in thost:
            check(m.get("readOnly") is True,
                  "token-file-client-example: mount the token files read-only")
sink_example = re.search(r'#\s*path = "([^"]+)"', config_text.split("[[sinks]]", 1)[-1])
check(sink_example and sink_example.group(1).startswith(files_dir + "/"),
      f"configmap.yaml: the commented [[sinks]] example must write under {files_dir}")

# The Secret template holds placeholder text only.
secret = load("secret-example.yaml")
for k, v in {**secret.get("stringData", {}), **secret.get("data", {})}.items():
    check(str(v).startswith("REPLACE-ME"), f"secret-example: {k} must be placeholder text")

# The Dockerfile.
docker = (root / "deploy/docker/Dockerfile").read_text()
froms = re.findall(r"(?m)^FROM\s+(\S+)", docker)
check(len(froms) >= 2, "Dockerfile: expected a multi-stage build (two FROM lines)")
check("cargo build --release --locked" in docker, "Dockerfile: build with cargo build --release --locked")
last_stage = docker[docker.rfind("\nFROM "):]
users = re.findall(r"(?m)^USER\s+(\S+)", last_stage)
check(users == [f"{uid}:{gid}"], f"Dockerfile: runtime stage must run as USER {uid}:{gid} (DaemonSet's), got {users}")
check(re.search(r'(?m)^ENTRYPOINT \["/usr/bin/token-broker"\]', last_stage),
      "Dockerfile: ENTRYPOINT must be the binary")
check((root / "deploy/docker/Dockerfile.dockerignore").is_file(),
      "Dockerfile: deploy/docker/Dockerfile.dockerignore keeps target/ out of the context")

# The metadata-endpoint component: its patch applied to the DaemonSet as
# kustomize's strategic merge would (pod-spec fields, container env by
# name), written out for schema validation. The endpoint must listen on the
# node's IP from the downward API, never on every address.
component = k8s / "metadata-endpoint"
patch = yaml.safe_load((component / "daemonset-patch.yaml").read_text())
merged = yaml.safe_load((k8s / "daemonset.yaml").read_text())
patch_spec = patch["spec"]["template"]["spec"]
merged_spec = merged["spec"]["template"]["spec"]
for field, value in patch_spec.items():
    if field != "containers":
        merged_spec[field] = value
by_name = {c["name"]: c for c in merged_spec["containers"]}
for container in patch_spec.get("containers", []):
    if check(container["name"] in by_name,
             f"metadata-endpoint patch: no container {container['name']} in daemonset.yaml"):
        env = by_name[container["name"]].setdefault("env", [])
        env.extend(container.get("env", []))
check(merged_spec.get("hostNetwork") is True, "metadata-endpoint patch: hostNetwork must be true")
patched_env = {e["name"]: e for c in merged_spec["containers"] for e in c.get("env", [])}
host_ip = patched_env.get("HOST_IP", {}).get("valueFrom", {}).get("fieldRef", {})
check(host_ip.get("fieldPath") == "status.hostIP",
      "metadata-endpoint patch: HOST_IP must come from status.hostIP")
listen = patched_env.get("TOKEN_BROKER__METADATA_ENDPOINT__LISTEN", {}).get("value", "")
check(listen.startswith("$(HOST_IP):"),
      "metadata-endpoint patch: the endpoint must listen on $(HOST_IP), not on every address")
(out / "daemonset-metadata-endpoint.yaml").write_text(yaml.safe_dump(merged))
(out / "metadata-endpoint-port").write_text(listen.rsplit(":", 1)[-1])

for p in problems:
    print(f"FAIL {p}")
if problems:
    sys.exit(1)
print(f"deploy consistency: OK (socket {socket_path}, broker uid:gid {uid}:{gid})")
