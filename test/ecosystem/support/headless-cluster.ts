/**
 * A headless Kubernetes cluster: etcd and kube-apiserver (support/control-plane.ts), no kubelet and no
 * container runtime. The chart is installed for real by the pinned helm (ServiceAccounts, RBAC, CSIDriver,
 * StorageClass, VolumeSnapshotClass, the SnapshotMetadataService...; its StatefulSet or DaemonSet is
 * stored but never runs), and the programs its pod would run are started here as processes instead:
 * `cbt-csi serve` and the sidecars, each with the exact args the chart renders for its container, where
 * only what a container changes is mapped (see ContainerView): $(VAR) expanded as kubelet does, container
 * paths to this cluster's directories, ports to free loopback ports, and in-cluster API access to a
 * kubeconfig with a token of the pod's own ServiceAccount (TokenRequest), so the chart's RBAC is what
 * the sidecars run with. snapshot-controller runs the same way with upstream's own RBAC and args.
 *
 * In mode daemonset there is one plugin pod per node (options.nodes): each its own driver (own state
 * directory, node ID and pod IP, 127.0.1.N on loopback), its own sidecars, and a Pod object made from the
 * DaemonSet's template with the status kubelet would report (Running, podIP), which the drivers' peer
 * discovery lists. Ports a container binds on its pod IP keep one port number across pods (the peer port:
 * every driver dials its peers on its own); the rest map to free loopback ports per pod.
 *
 * What kubelet and kube-controller-manager would do is in kubelet-standin.ts and pv-controller-standin.ts.
 * Needs root with /dev/fuse and loop devices (the driver's node data plane) and the programs of
 * scripts/ecosystem/build.sh; see missingForHeadlessCluster.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseAllDocuments } from 'yaml';
import { parseMountInfo } from '../../../src/dataplane/fuse/mount.js';
import { Identity } from '../../../src/gen/csi/v1/csi_pb.js';
import { missingDataPlane } from '../../e2e/support/node-env.js';
import { ServiceClient } from '../../support/csi-client.js';
import { REPO_ROOT, TSX_LOADER } from '../../support/test-driver.js';
import { COMPONENTS, componentOf, missingTools, tool, toolPath } from '../tools.js';
import { crdFiles, startControlPlane, type ControlPlane } from './control-plane.js';
import { KubeApi, type KubeObject } from './kube-api.js';

export const CHART = path.join(REPO_ROOT, 'charts/cbt-csi');
/** The node of a one-node cluster: where the plugin pod "runs", and the driver's node ID. */
export const NODE_NAME = 'headless-node-1';

/** The chart's sidecars that talk to the API server, by container name (= program name in versions.json). */
export type ChartSidecar = 'csi-provisioner' | 'csi-snapshotter' | 'csi-resizer' | 'csi-snapshot-metadata';

/** The programs every headless cluster runs; the sidecars are added per test. */
export const CLUSTER_PROGRAMS = ['etcd', 'kube-apiserver', 'kubectl', 'helm', 'snapshot-controller'] as const;

/** Why a headless cluster with these sidecars cannot run here, or undefined. */
export function missingForHeadlessCluster(sidecars: readonly ChartSidecar[]): string | undefined {
  return missingDataPlane() ?? missingTools([...CLUSTER_PROGRAMS, ...sidecars]);
}

/** Whether a sidecar's program is built here (csi-resizer is optional where its component cannot build). */
export const isBuilt = (program: string): boolean => toolPath(program) !== undefined;

export interface RunningProcess {
  /** The chart's container name, or the program's. */
  name: string;
  /** The plugin pod it is a container of (none for snapshot-controller). */
  pod?: string;
  /** What it is and which version: the versions.json component, or cbt-csi from package.json. */
  component: string;
  version: string;
  /** The program and its args exactly as started. */
  command: string[];
  log: string;
  child: ChildProcess;
}

/** How one container of the chart's plugin pod runs here. */
export interface ContainerView {
  name: string;
  /** Its args as the chart renders them. */
  chartArgs: string[];
  /** The args as run: $(VAR) expanded, container paths and ports mapped (kubeconfig not included). */
  args: string[];
  /** Its environment, as kubelet resolves it (values and fieldRefs). */
  env: Record<string, string>;
  /** Each volume mount: the path inside the container and the directory that stands for it here. */
  mounts: { mountPath: string; local: string }[];
  /** The pod's ports its args name (containerPort → port on 127.0.0.1); shared by the pod's containers. */
  ports: Record<number, number>;
  /** The pod's ServiceAccount, whose token the container authenticates with. */
  serviceAccount: { namespace: string; name: string };
}

export interface HeadlessClusterOptions {
  /** Helm values (default: none, the chart's defaults: mode single). */
  values?: Record<string, unknown>;
  /** Chart sidecars to start as processes once the driver runs (default none; start more with startSidecar). */
  sidecars?: readonly ChartSidecar[];
  release?: string;
  namespace?: string;
  /** The nodes (default one, NODE_NAME). More than one needs values.mode daemonset: a plugin pod on each. */
  nodes?: readonly string[];
  /**
   * snapshot-controller with --enable-distributed-snapshotting and the nodes rule upstream's RBAC ships
   * commented out for it: what the chart's mode daemonset asks for (csi-snapshotter --node-deployment).
   */
  distributedSnapshotting?: boolean;
  /** Namespaces created before helm install (e.g. a backup client's, where the chart puts a Role). */
  namespaces?: readonly string[];
  /** Objects created after helm install and before any process starts (e.g. a Secret the values name). */
  objects?: KubeObject[];
}

/** One node's plugin pod: its driver and sidecars as processes, and how its containers map here. */
export interface PluginPod {
  nodeName: string;
  podName: string;
  /** Its pod IP: an address of its own on loopback (127.0.1.N). */
  podIP: string;
  /** The driver's CSI endpoint (`unix:///…/csi.sock`) on this node. */
  csiEndpoint: string;
  /** The driver's state directory on this node. */
  stateDir: string;
  /** A node host path as it exists here for this node. /dev is the machine's own. */
  hostPath(p: string): string;
  /** How a container of this pod runs here. */
  container(name: string): Promise<ContainerView>;
  /** Starts a chart sidecar in this pod (see HeadlessCluster.startSidecar). */
  startSidecar(name: ChartSidecar, extraArgs?: string[]): Promise<RunningProcess>;
  /** Its processes now running or last run (a restarted container replaces the one before). */
  processes(): RunningProcess[];
  /** Whether every container runs (the pod's Ready condition; a Service sends it connections only then). */
  ready(): boolean;
  /**
   * Kills the driver (a crash); the pod is not ready until restart(). From then on its sidecars are started
   * again whenever they exit (some do when they lose the driver), as kubelet restarts containers.
   */
  killDriver(signal?: NodeJS.Signals): Promise<void>;
  /**
   * As kubelet restarts the driver's container: starts it on the same state until it answers Probe, then
   * starts the pod's sidecars again (they would exit on their first call to the new driver).
   */
  restart(): Promise<void>;
}

export interface HeadlessCluster {
  dir: string;
  controlPlane: ControlPlane;
  /** Admin (system:masters) REST client. */
  api: KubeApi;
  release: string;
  namespace: string;
  /** One plugin pod per node, in the order of options.nodes. */
  pods: PluginPod[];
  /** The first node's name; csiEndpoint, stateDir, hostPath, container and startSidecar are its pod's. */
  nodeName: string;
  /** The chart's values as installed (`helm get values --all`). */
  values: Record<string, unknown>;
  /** Every object the chart installed (`helm get manifest`). */
  objects: KubeObject[];
  /** The CSI driver's name (CSIDriver object, StorageClass provisioner). */
  driverName: string;
  /** The driver's CSI endpoint (`unix:///…/csi.sock`): what the sidecars and kubelet talk to. */
  csiEndpoint: string;
  /** The driver's state directory here. */
  stateDir: string;
  /** Where start-up time went, step by step. */
  startup: string[];
  /** Every process started here (the control plane's are its own). */
  processes(): RunningProcess[];
  /** A node host path (as the chart names it, e.g. /var/lib/kubelet/...) as it exists here. /dev is the machine's own. */
  hostPath(p: string): string;
  /** How a container of the chart's pod runs here (args mapped, secrets written as kubelet would mount them). */
  container(name: string): Promise<ContainerView>;
  /** A token of a ServiceAccount (TokenRequest, as kubelet requests them for pods). */
  serviceAccountToken(
    namespace: string,
    name: string,
    options?: { audiences?: string[]; expirationSeconds?: number },
  ): Promise<string>;
  /** A kubeconfig file that authenticates with `token`, for kubectl or a Go program's --kubeconfig. */
  writeKubeconfig(name: string, token: string): string;
  /** Starts a chart sidecar's program with its container's mapped args and its ServiceAccount's kubeconfig. */
  startSidecar(name: ChartSidecar, extraArgs?: string[]): Promise<RunningProcess>;
  /** Throws (with the log's tail) if a started process has exited (except in a pod whose driver was killed). */
  assertRunning(): void;
  /** Polls the API like KubeApi.waitFor, failing early if a process died. */
  waitFor(
    path: string,
    done: (o: KubeObject | undefined) => boolean,
    what: string,
    timeoutMs?: number,
  ): Promise<KubeObject | undefined>;
  /** What is still running, mounted or attached under this cluster (empty once stopped cleanly). */
  leftovers(): string[];
  /**
   * Stops every process (sidecars first, the driver last but one, then the control plane) and removes
   * the directory. Resolves with what had to be forced: SIGKILLed processes, mounts and loop devices
   * the driver left behind (each then removed).
   */
  stop(): Promise<string[]>;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** How long `cbt-csi serve` may take to answer Probe (tsx compiles it at start; slow under load). */
const DRIVER_START_TIMEOUT_MS = 180_000;

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** A module's directory in the Go module cache (build.sh filled it; GOPROXY=off keeps tests offline). */
function moduleDir(module: string, version: string): string {
  const r = spawnSync('go', ['mod', 'download', '-json', `${module}@${version}`], {
    encoding: 'utf8',
    env: { ...process.env, GOPROXY: 'off', GOFLAGS: '-mod=mod' },
  });
  if (r.status !== 0)
    throw new Error(`go mod download ${module}@${version} (run scripts/ecosystem/build.sh): ${r.stdout}${r.stderr}`);
  return (JSON.parse(r.stdout) as { Dir: string }).Dir;
}

const alive = (child: ChildProcess) => child.exitCode === null && child.signalCode === null;

const tail = (file: string, bytes = 4000) => {
  try {
    return fs.readFileSync(file, 'utf8').slice(-bytes);
  } catch {
    return '';
  }
};

/** PIDs of processes whose command line names a path under one of `dirs` (etcd, kube-apiserver, anything started here). */
function processesNaming(dirs: readonly string[]): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    let cmdline: string;
    try {
      cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    if (dirs.some((d) => cmdline.includes(`${d}/`) || cmdline.split('\0').includes(d))) pids.push(Number(entry));
  }
  return pids;
}

/** The program's own version line (`--version`), to print what ran. */
export function reportedVersion(program: string): string {
  const args =
    program === 'kubectl' ? ['version', '--client'] : program === 'helm' ? ['version', '--short'] : ['--version'];
  const r = spawnSync(tool(program), args, { encoding: 'utf8', timeout: 10_000 });
  return (`${r.stdout}${r.stderr}`.trim().split('\n')[0] ?? '').replace(tool(program), program);
}

export async function startHeadlessCluster(options: HeadlessClusterOptions = {}): Promise<HeadlessCluster> {
  const release = options.release ?? 'cbt-csi';
  const namespace = options.namespace ?? 'cbt-system';
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-cluster-'));
  fs.chmodSync(dir, 0o700);
  const procs: RunningProcess[] = [];
  let controlPlane: ControlPlane | undefined;
  let api: KubeApi | undefined;
  const nodes = options.nodes ?? [NODE_NAME];
  /** Port numbers of containers that bind their pod's IP: one number for all pods (the peer port). */
  const podIPPorts = new Map<number, number>();
  /** Pods whose driver was killed on purpose: their processes may be down until restart(). */
  const down = new Set<string>();
  /** Pods whose sidecars are started again when they exit (kubelet's restart policy), after a killDriver. */
  const supervised = new Set<string>();
  const idle = { stopped: false };
  const startup: string[] = [];

  /** A node's host path: /dev is the machine's; the rest under the node's own directory. */
  const hostPathOf = (node: string) => (p: string) =>
    p === '/dev' || p.startsWith('/dev/') ? p : path.join(dir, 'nodes', node, p);

  /** Starts a program; `replacing` (a restarted container) takes the place of the process before it. */
  const startProcess = (
    name: string,
    component: string,
    version: string,
    file: string,
    args: string[],
    env: Record<string, string> = {},
    pod?: string,
    replacing?: RunningProcess,
  ): RunningProcess => {
    const log = path.join(dir, 'logs', `${pod ? `${pod}-` : ''}${name}.log`);
    fs.mkdirSync(path.dirname(log), { recursive: true });
    const fd = fs.openSync(log, 'a', 0o600);
    const child = spawn(file, args, { stdio: ['ignore', fd, fd], env: { ...process.env, ...env }, cwd: REPO_ROOT });
    fs.closeSync(fd);
    const p: RunningProcess = { name, pod, component, version, command: [file, ...args], log, child };
    const at = replacing ? procs.indexOf(replacing) : -1;
    if (at >= 0) procs[at] = p;
    else procs.push(p);
    return p;
  };
  /** The process's environment besides the machine's, kept for a restart. */
  const envOf = new WeakMap<RunningProcess, Record<string, string>>();

  const assertRunning = () => {
    if (idle.stopped) return;
    for (const p of procs) {
      if (p.pod && (down.has(p.pod) || supervised.has(p.pod))) continue;
      if (!alive(p.child))
        throw new Error(
          `${p.pod ? `${p.pod}/` : ''}${p.name} exited (${p.child.exitCode ?? p.child.signalCode}); last log:\n${tail(p.log)}`,
        );
    }
  };

  const writeKubeconfig = (name: string, token: string) => {
    const file = path.join(dir, 'kubeconfigs', `${name}.kubeconfig`);
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    fs.writeFileSync(
      file,
      JSON.stringify({
        apiVersion: 'v1',
        kind: 'Config',
        clusters: [
          {
            name: 'headless',
            cluster: { server: controlPlane!.server, 'certificate-authority': controlPlane!.caFile },
          },
        ],
        users: [{ name, user: { token } }],
        contexts: [{ name, context: { cluster: 'headless', user: name } }],
        'current-context': name,
      }),
      { mode: 0o600 },
    );
    return file;
  };

  const serviceAccountToken: HeadlessCluster['serviceAccountToken'] = async (ns, name, opts = {}) => {
    const answer = await api!.create(`/api/v1/namespaces/${ns}/serviceaccounts/${name}/token`, {
      apiVersion: 'authentication.k8s.io/v1',
      kind: 'TokenRequest',
      spec: { audiences: opts.audiences ?? null, expirationSeconds: opts.expirationSeconds ?? 3600 },
    });
    return answer.status.token as string;
  };

  const stopProcess = async (p: RunningProcess, forced: string[]) => {
    if (!alive(p.child)) return;
    const exited = new Promise<void>((resolve) => p.child.once('exit', () => resolve()));
    p.child.kill('SIGTERM');
    const timer = setTimeout(() => {
      forced.push(
        `${p.pod ? `${p.pod}/` : ''}${p.name} (pid ${p.child.pid}) did not exit on SIGTERM within 30 s: SIGKILLed`,
      );
      p.child.kill('SIGKILL');
    }, 30_000);
    await exited;
    clearTimeout(timer);
  };

  const loopsUnderDir = () => {
    const list = spawnSync('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE'], { encoding: 'utf8' });
    if (list.status !== 0 || !list.stdout.trim()) return [];
    return (JSON.parse(list.stdout) as { loopdevices: { name: string; 'back-file': string | null }[] }).loopdevices
      .filter((d) => (d['back-file'] ?? '').startsWith(`${dir}/`))
      .map((d) => ({ name: d.name, backFile: d['back-file']! }));
  };
  const mountsUnderDir = () =>
    parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8')).filter(
      (m) => m.mountPoint === dir || m.mountPoint.startsWith(`${dir}/`),
    );

  const leftovers = () => [
    ...procs
      .filter((p) => alive(p.child))
      .map((p) => `process ${p.pod ? `${p.pod}/` : ''}${p.name} (pid ${p.child.pid}) still running`),
    ...processesNaming([dir, ...(controlPlane ? [controlPlane.dir] : [])])
      .filter((pid) => !procs.some((p) => p.child.pid === pid))
      .map((pid) => `process ${pid} naming this cluster's directories still running`),
    ...mountsUnderDir().map((m) => `${m.fsType} still mounted at ${m.mountPoint}`),
    ...loopsUnderDir().map((d) => `loop device ${d.name} still attached to ${d.backFile}`),
    ...(fs.existsSync(dir) ? [`directory ${dir} still exists`] : []),
  ];

  let stopping: Promise<string[]> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      idle.stopped = true;
      const forced: string[] = [];
      api?.close();
      // The drivers last: the sidecars may be mid-call to them.
      const drivers = procs.filter((p) => p.name === 'cbt-csi');
      await Promise.all(procs.filter((q) => q.name !== 'cbt-csi').map((p) => stopProcess(p, forced)));
      // Listed before the drivers go: a loop device's backing file has no path once the FUSE mount is gone.
      const loopsBefore = loopsUnderDir();
      await Promise.all(drivers.map((p) => stopProcess(p, forced)));
      for (const m of mountsUnderDir().reverse()) {
        forced.push(`${m.fsType} left mounted at ${m.mountPoint}: unmounted`);
        spawnSync('umount', ['-l', m.mountPoint]);
      }
      for (const d of loopsBefore) {
        if (spawnSync('losetup', ['-d', d.name]).status === 0)
          forced.push(`loop device ${d.name} left attached: detached`);
      }
      // CBT_CLUSTER_LOGS=<dir>: every program's log is kept there, for a failure's post-mortem.
      const keep = process.env.CBT_CLUSTER_LOGS;
      if (keep) {
        fs.mkdirSync(keep, { recursive: true });
        for (const p of procs) fs.copyFileSync(p.log, path.join(keep, path.basename(p.log)));
        for (const name of ['etcd.log', 'kube-apiserver.log'])
          if (controlPlane) fs.copyFileSync(path.join(controlPlane.dir, name), path.join(keep, name));
      }
      await controlPlane?.stop();
      fs.rmSync(dir, { recursive: true, force: true });
      return forced;
    })();
    return stopping;
  };

  try {
    // ---- control plane, CRDs, and snapshot-controller's upstream RBAC
    let mark = Date.now();
    const took = (what: string) => {
      startup.push(`${what} ${((Date.now() - mark) / 1000).toFixed(1)} s`);
      mark = Date.now();
    };
    controlPlane = await startControlPlane();
    took('etcd + kube-apiserver ready');
    api = new KubeApi(controlPlane.server, controlPlane.adminToken, fs.readFileSync(controlPlane.caFile));
    const kubectl = controlPlane.kubectl;
    kubectl(['apply', '--server-side', ...crdFiles().flatMap((f) => ['-f', f])]);
    kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd', '--all']);
    took('CRDs established');
    const snapshotter = COMPONENTS['external-snapshotter']!;
    const controllerDeploy = path.join(
      moduleDir(snapshotter.module, snapshotter.version),
      'deploy/kubernetes/snapshot-controller',
    );
    const controllerRbac = fs.readFileSync(path.join(controllerDeploy, 'rbac-snapshot-controller.yaml'), 'utf8');
    const nodesRule = /^ {2}# - apiGroups: \[""\]\n {2}# {3}resources: \["nodes"\]\n {2}# {3}verbs: .*$/m;
    if (options.distributedSnapshotting && !nodesRule.test(controllerRbac))
      throw new Error("upstream's snapshot-controller RBAC no longer has the commented nodes rule: look at it");
    // With distributed snapshotting upstream says to enable its commented-out rule on nodes.
    kubectl(['apply', '-f', '-'], {
      input: options.distributedSnapshotting
        ? controllerRbac.replace(nodesRule, (rule) => rule.replaceAll('  # ', '  '))
        : controllerRbac,
    });

    // ---- the chart, installed by helm
    const helmEnv = {
      ...process.env,
      HELM_CACHE_HOME: path.join(dir, 'helm/cache'),
      HELM_CONFIG_HOME: path.join(dir, 'helm/config'),
      HELM_DATA_HOME: path.join(dir, 'helm/data'),
    };
    const helm = (args: string[]) => {
      const r = spawnSync(tool('helm'), [...args, '--kubeconfig', controlPlane!.kubeconfig], {
        encoding: 'utf8',
        env: helmEnv,
      });
      if (r.status !== 0) throw new Error(`helm ${args.join(' ')}: ${r.stderr}${r.stdout}`);
      return r.stdout;
    };
    for (const name of options.namespaces ?? [])
      await api.create('/api/v1/namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name } });
    const valuesFile = path.join(dir, 'values.json');
    fs.writeFileSync(valuesFile, JSON.stringify(options.values ?? {}));
    helm(['install', release, CHART, '--namespace', namespace, '--create-namespace', '-f', valuesFile]);
    const values = JSON.parse(
      helm(['get', 'values', release, '--namespace', namespace, '--all', '-o', 'json']),
    ) as Record<string, unknown>;
    const objects = parseAllDocuments(helm(['get', 'manifest', release, '--namespace', namespace]))
      .map((d) => d.toJS() as KubeObject | null)
      .filter((o): o is KubeObject => o !== null);
    const driverName = values.driverName as string;
    took('helm install');

    for (const object of options.objects ?? []) {
      const group = object.apiVersion!.includes('/') ? `/apis/${object.apiVersion}` : `/api/${object.apiVersion}`;
      const scope = object.metadata.namespace ? `/namespaces/${object.metadata.namespace}` : '';
      await api.create(`${group}${scope}/${object.kind!.toLowerCase()}s`, object);
    }

    // ---- the plugin pods' containers, as they run here
    const workloads = objects.filter((o) => o.kind === 'StatefulSet' || o.kind === 'DaemonSet');
    const daemonSet = workloads.find((w) => w.kind === 'DaemonSet');
    if (nodes.length > 1 && !daemonSet) throw new Error(`${nodes.length} nodes need values.mode daemonset`);
    const packageVersion = (
      JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string }
    ).version;

    const pluginPod = (nodeName: string, index: number): PluginPod => {
      const hostPath = hostPathOf(nodeName);
      const podIP = `127.0.1.${index + 1}`;
      const podName = daemonSet
        ? `${daemonSet.metadata.name}-${nodeName}`
        : `${workloads[0]?.metadata.name ?? release}-${index}`;
      /** Container port → port here, for ports bound on loopback or every address: one map for the pod. */
      const podPorts = new Map<number, number>();
      const mine = () => procs.filter((p) => p.pod === podName);

      const container = async (name: string): Promise<ContainerView> => {
        const workload = workloads.find((w) =>
          w.spec.template.spec.containers.some((c: { name: string }) => c.name === name),
        );
        if (!workload) throw new Error(`the chart renders no container ${name} (with these values)`);
        const podSpec = workload.spec.template.spec;
        const spec = podSpec.containers.find((c: { name: string }) => c.name === name);
        const serviceAccount = { namespace, name: podSpec.serviceAccountName as string };
        const fields: Record<string, string> = {
          'spec.nodeName': nodeName,
          'metadata.name': podName,
          'metadata.namespace': namespace,
          'spec.serviceAccountName': serviceAccount.name,
          'status.podIP': podIP,
        };
        const env: Record<string, string> = {};
        for (const e of (spec.env ?? []) as {
          name: string;
          value?: string;
          valueFrom?: { fieldRef?: { fieldPath: string } };
        }[]) {
          const value = e.value ?? fields[e.valueFrom?.fieldRef?.fieldPath ?? ''];
          if (value === undefined)
            throw new Error(`${name}: env ${e.name} comes from something this cluster cannot resolve`);
          env[e.name] = value;
        }
        const mounts: ContainerView['mounts'] = [];
        for (const m of (spec.volumeMounts ?? []) as { name: string; mountPath: string }[]) {
          const volume = podSpec.volumes.find((v: { name: string }) => v.name === m.name);
          let local: string;
          if (volume?.hostPath) {
            local = hostPath(volume.hostPath.path);
            fs.mkdirSync(local, { recursive: true });
          } else if (volume?.secret) {
            // As kubelet mounts a secret volume: one file per key.
            local = path.join(dir, 'pods', podName, 'volumes', m.name);
            fs.mkdirSync(local, { recursive: true, mode: 0o700 });
            const secret = await api!.get(`/api/v1/namespaces/${namespace}/secrets/${volume.secret.secretName}`);
            for (const [key, data] of Object.entries((secret.data ?? {}) as Record<string, string>))
              fs.writeFileSync(path.join(local, key), Buffer.from(data, 'base64'), { mode: 0o600 });
          } else throw new Error(`${name}: volume ${m.name} is of a kind this cluster does not provide`);
          mounts.push({ mountPath: m.mountPath, local });
        }
        const byDepth = [...mounts].sort((a, b) => b.mountPath.length - a.mountPath.length);
        const mapPath = (p: string) => {
          const m = byDepth.find((x) => p === x.mountPath || p.startsWith(`${x.mountPath}/`));
          return m ? m.local + p.slice(m.mountPath.length) : p;
        };
        const declared = new Set<number>(
          workload.spec.template.spec.containers.flatMap((c: { ports?: { containerPort: number }[] }) =>
            (c.ports ?? []).map((p) => p.containerPort),
          ),
        );
        const portFor = async (ports: Map<number, number>, port: number) => {
          let local = ports.get(port);
          if (local === undefined) {
            local = await freePort();
            ports.set(port, local);
          }
          return local;
        };
        const mapValue = async (flag: string, value: string) => {
          if (value.startsWith('unix://')) return `unix://${mapPath(value.slice('unix://'.length))}`;
          if (value.startsWith('/')) return mapPath(value);
          const onPodIP = new RegExp(`^${podIP.replaceAll('.', '\\.')}:(\\d+)$`).exec(value);
          if (onPodIP) return `${podIP}:${await portFor(podIPPorts, Number(onPodIP[1]))}`;
          const hostPort = /^(?:[0-9.]*|localhost|\[::\]):(\d+)$/.exec(value);
          if (hostPort) return `127.0.0.1:${await portFor(podPorts, Number(hostPort[1]))}`;
          if (/port/i.test(flag) && /^\d+$/.test(value) && declared.has(Number(value)))
            return String(await portFor(podPorts, Number(value)));
          return value;
        };
        const expand = (s: string) =>
          s.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (whole, v: string) => env[v] ?? whole);
        const chartArgs = (spec.args ?? []) as string[];
        const args: string[] = [];
        for (const raw of chartArgs) {
          const arg = expand(raw);
          const flag = /^(--?[\w.-]+)=([\s\S]*)$/.exec(arg);
          if (flag) args.push(`${flag[1]}=${await mapValue(flag[1]!, flag[2]!)}`);
          else args.push(arg.startsWith('-') ? arg : await mapValue('', arg));
        }
        return { name, chartArgs, args, env, mounts, ports: Object.fromEntries(podPorts), serviceAccount };
      };

      /** A kubeconfig with a token of the container's ServiceAccount: what in-cluster config gives a pod. */
      const inClusterConfig = async (view: ContainerView) => {
        const token = await serviceAccountToken(view.serviceAccount.namespace, view.serviceAccount.name);
        return writeKubeconfig(`${podName}-${view.name}-${view.serviceAccount.name}`, token);
      };

      let csiEndpoint = '';
      let stateDir = '';
      /** Starts the driver (again: replacing its last process) and waits until it answers Probe. */
      const startDriver = async (replacing?: RunningProcess) => {
        const view = await container('cbt-csi');
        csiEndpoint = view.args.find((a) => a.startsWith('--endpoint='))!.slice('--endpoint='.length);
        stateDir = view.args.find((a) => a.startsWith('--state-dir='))!.slice('--state-dir='.length);
        const env = { ...view.env, KUBECONFIG: await inClusterConfig(view) };
        const driver = startProcess(
          'cbt-csi',
          'cbt-csi (this repository, `cbt-csi serve` from source)',
          packageVersion,
          process.execPath,
          ['--import', TSX_LOADER, path.join(REPO_ROOT, 'src/cli.ts'), 'serve', ...view.args],
          env,
          podName,
          replacing,
        );
        const identity = new ServiceClient(Identity, csiEndpoint);
        try {
          // Three tsx-compiled drivers starting at once on a loaded 2-core machine have taken 75 s.
          const deadline = Date.now() + DRIVER_START_TIMEOUT_MS;
          for (;;) {
            if (!alive(driver.child)) throw new Error(`cbt-csi serve (${nodeName}) exited:\n${tail(driver.log)}`);
            try {
              if ((await identity.call('probe', {}, { deadlineMs: 2_000 })).ready !== false) break;
            } catch {
              // not listening yet
            }
            if (Date.now() > deadline)
              throw new Error(
                `cbt-csi serve (${nodeName}) not ready after ${DRIVER_START_TIMEOUT_MS / 1000} s:\n${tail(driver.log)}`,
              );
            await sleep(250);
          }
        } finally {
          identity.close();
        }
      };

      const pod: PluginPod = {
        nodeName,
        podName,
        podIP,
        get csiEndpoint() {
          return csiEndpoint;
        },
        get stateDir() {
          return stateDir;
        },
        hostPath,
        container,
        async startSidecar(name, extraArgs = []) {
          const view = await container(name);
          const kubeconfig = await inClusterConfig(view);
          const [component, c] = componentOf(name);
          const p = startProcess(
            name,
            component,
            c.version,
            tool(name),
            [...view.args, `--kubeconfig=${kubeconfig}`, ...extraArgs],
            view.env,
            podName,
          );
          envOf.set(p, view.env);
          return p;
        },
        processes: mine,
        ready: () => !down.has(podName) && mine().every((p) => alive(p.child)),
        async killDriver(signal = 'SIGKILL') {
          down.add(podName);
          supervised.add(podName);
          // From now on kubelet's restartPolicy Always: a sidecar that exits (as some do once they lose their
          // driver) is started again, and waits for the driver's socket as in a pod.
          for (const p of mine()) if (p.name !== 'cbt-csi') keepRunning(p);
          const driver = mine().find((p) => p.name === 'cbt-csi')!;
          if (!alive(driver.child)) return;
          const exited = new Promise<void>((resolve) => driver.child.once('exit', () => resolve()));
          driver.child.kill(signal);
          await exited;
        },
        async restart() {
          const driver = mine().find((p) => p.name === 'cbt-csi')!;
          if (!alive(driver.child)) await startDriver(driver);
          // A sidecar still connected to the killed driver exits on its first call to the new one (csi-lib-utils'
          // connection-loss check; csi-snapshot-metadata v1.1.0 does so seconds later), and kubelet starts it
          // again. Started again here at once, so the test does not hang on when that exit comes.
          for (const p of mine().filter((q) => q.name !== 'cbt-csi')) {
            if (alive(p.child)) {
              const exited = new Promise<void>((resolve) => p.child.once('exit', () => resolve()));
              p.child.kill('SIGTERM');
              await exited;
            }
            const [file, ...args] = p.command;
            const again = startProcess(p.name, p.component, p.version, file!, args, envOf.get(p) ?? {}, podName, p);
            envOf.set(again, envOf.get(p) ?? {});
            keepRunning(again);
          }
          down.delete(podName);
        },
      };
      /** Starts `p` again whenever it exits, after a second (kubelet's back-off, shortened), until the cluster stops. */
      const keepRunning = (p: RunningProcess) => {
        p.child.once('exit', () => {
          setTimeout(() => {
            if (idle.stopped || !procs.includes(p)) return;
            const [file, ...args] = p.command;
            const again = startProcess(p.name, p.component, p.version, file!, args, envOf.get(p) ?? {}, podName, p);
            envOf.set(again, envOf.get(p) ?? {});
            keepRunning(again);
          }, 1000);
        });
      };
      return Object.assign(pod, { startDriver });
    };

    // ---- one plugin pod per node: in mode daemonset the Pod object the DaemonSet controller would make,
    // with the status its node's kubelet would report (the drivers find their peers by listing these)
    const pods = nodes.map((node, i) => pluginPod(node, i));
    if (daemonSet) {
      for (const pod of pods) {
        const template = daemonSet.spec.template;
        await api.create(`/api/v1/namespaces/${namespace}/pods`, {
          apiVersion: 'v1',
          kind: 'Pod',
          metadata: {
            name: pod.podName,
            namespace,
            labels: template.metadata.labels,
            annotations: template.metadata.annotations,
          },
          spec: { ...template.spec, nodeName: pod.nodeName },
        });
        const now = new Date().toISOString();
        await api.patch(`/api/v1/namespaces/${namespace}/pods/${pod.podName}/status`, {
          status: {
            phase: 'Running',
            podIP: pod.podIP,
            podIPs: [{ ip: pod.podIP }],
            hostIP: pod.podIP,
            startTime: now,
            conditions: [{ type: 'Ready', status: 'True', lastTransitionTime: now }],
          },
        });
      }
    }
    await Promise.all(pods.map((pod) => (pod as PluginPod & { startDriver(): Promise<void> }).startDriver()));
    took(`cbt-csi serve ready${pods.length > 1 ? ` on ${pods.length} nodes` : ''}`);

    const first = pods[0]!;
    const cluster: HeadlessCluster = {
      dir,
      controlPlane,
      api,
      release,
      namespace,
      pods,
      nodeName: first.nodeName,
      values,
      objects,
      driverName,
      csiEndpoint: first.csiEndpoint,
      stateDir: first.stateDir,
      startup,
      processes: () => [...procs],
      hostPath: first.hostPath,
      container: first.container,
      serviceAccountToken,
      writeKubeconfig,
      startSidecar: first.startSidecar,
      assertRunning,
      async waitFor(p, done, what, timeoutMs = 60_000) {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
          assertRunning();
          const object = await api!.find(p);
          if (done(object)) return object;
          if (Date.now() > deadline)
            throw new Error(
              `timed out after ${timeoutMs / 1000} s waiting for ${what}; last seen:\n${JSON.stringify(object, null, 2)}`,
            );
          await sleep(250);
        }
      },
      leftovers,
      stop,
    };

    // ---- snapshot-controller: upstream's Deployment args, its own ServiceAccount's token
    const deployment = parseAllDocuments(
      fs.readFileSync(path.join(controllerDeploy, 'setup-snapshot-controller.yaml'), 'utf8'),
    )
      .map((d) => d.toJS() as KubeObject | null)
      .find((o) => o?.kind === 'Deployment')!;
    const controllerSpec = deployment.spec.template.spec;
    const controllerNamespace = deployment.metadata.namespace ?? 'kube-system';
    const controllerToken = await serviceAccountToken(controllerNamespace, controllerSpec.serviceAccountName);
    startProcess('snapshot-controller', 'external-snapshotter', snapshotter.version, tool('snapshot-controller'), [
      ...(controllerSpec.containers[0].args as string[]),
      `--kubeconfig=${writeKubeconfig('snapshot-controller', controllerToken)}`,
      ...(options.distributedSnapshotting ? ['--enable-distributed-snapshotting'] : []),
      // In a pod the lease namespace defaults to the pod's; out of cluster it would be "default".
      `--leader-election-namespace=${controllerNamespace}`,
    ]);
    for (const pod of pods) for (const sidecar of options.sidecars ?? []) await pod.startSidecar(sidecar);
    await sleep(500);
    assertRunning();
    took('controllers and sidecars started');
    return cluster;
  } catch (err) {
    await stop();
    throw err;
  }
}

/**
 * What a cluster ran, one line a program: the pinned component and version, and the version the program
 * itself reports (`--version`), so a stale build cannot pass for the pin; under each started process, its
 * args ($DIR: the cluster's directory).
 */
export function whatRan(cluster: HeadlessCluster): string[] {
  const line = (program: string, component: string, version: string, reported: string) =>
    `${program.padEnd(22)} ${`${component} ${version}`.padEnd(40)} reports: ${reported}`;
  const lines = ['etcd', 'kube-apiserver', 'kubectl', 'helm'].map((program) => {
    const [component, c] = componentOf(program);
    return line(program, component, c.version, reportedVersion(program));
  });
  const reported = new Map<string, string>();
  for (const p of cluster.processes()) {
    const node = cluster.pods.length > 1 ? cluster.pods.find((pod) => pod.podName === p.pod)?.nodeName : undefined;
    const program = node ? `${p.name}@${node}` : p.name;
    if (p.name === 'cbt-csi') lines.push(line(program, 'cbt-csi', p.version, 'package.json (run from source by tsx)'));
    else {
      if (!reported.has(p.name)) reported.set(p.name, reportedVersion(p.name));
      lines.push(line(program, p.component, p.version, reported.get(p.name)!));
    }
    const args = p.name === 'cbt-csi' ? p.command.slice(p.command.indexOf('serve')) : p.command.slice(1);
    lines.push(`    ${args.join(' ').replaceAll(cluster.dir, '$DIR')}`);
  }
  return lines;
}
