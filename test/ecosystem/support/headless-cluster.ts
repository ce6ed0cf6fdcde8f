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
/** The one node of the cluster: where the plugin pod "runs", and the driver's node ID. */
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
}

export interface HeadlessCluster {
  dir: string;
  controlPlane: ControlPlane;
  /** Admin (system:masters) REST client. */
  api: KubeApi;
  release: string;
  namespace: string;
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
  /** Throws (with the log's tail) if a started process has exited. */
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
  const podPorts = new Map<number, number>();
  const idle = { stopped: false };
  const startup: string[] = [];

  const hostPath = (p: string) => (p === '/dev' || p.startsWith('/dev/') ? p : path.join(dir, 'host', p));

  const startProcess = (
    name: string,
    component: string,
    version: string,
    file: string,
    args: string[],
    env: Record<string, string> = {},
  ): RunningProcess => {
    const log = path.join(dir, 'logs', `${name}.log`);
    fs.mkdirSync(path.dirname(log), { recursive: true });
    const fd = fs.openSync(log, 'a', 0o600);
    const child = spawn(file, args, { stdio: ['ignore', fd, fd], env: { ...process.env, ...env }, cwd: REPO_ROOT });
    fs.closeSync(fd);
    const p: RunningProcess = { name, component, version, command: [file, ...args], log, child };
    procs.push(p);
    return p;
  };

  const assertRunning = () => {
    if (idle.stopped) return;
    for (const p of procs) {
      if (!alive(p.child))
        throw new Error(`${p.name} exited (${p.child.exitCode ?? p.child.signalCode}); last log:\n${tail(p.log)}`);
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
      forced.push(`${p.name} (pid ${p.child.pid}) did not exit on SIGTERM within 30 s: SIGKILLed`);
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
    ...procs.filter((p) => alive(p.child)).map((p) => `process ${p.name} (pid ${p.child.pid}) still running`),
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
      // The driver last: the sidecars may be mid-call to it.
      const driver = procs.filter((p) => p.name === 'cbt-csi');
      for (const p of procs.filter((q) => q.name !== 'cbt-csi').reverse()) await stopProcess(p, forced);
      // Listed before the driver goes: a loop device's backing file has no path once the FUSE mount is gone.
      const loopsBefore = loopsUnderDir();
      for (const p of driver) await stopProcess(p, forced);
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
    kubectl(['apply', '-f', path.join(controllerDeploy, 'rbac-snapshot-controller.yaml')]);

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

    // ---- the plugin pod's containers, as they run here
    const workloads = objects.filter((o) => o.kind === 'StatefulSet' || o.kind === 'DaemonSet');
    const container = async (name: string): Promise<ContainerView> => {
      const workload = workloads.find((w) =>
        w.spec.template.spec.containers.some((c: { name: string }) => c.name === name),
      );
      if (!workload) throw new Error(`the chart renders no container ${name} (with these values)`);
      const podSpec = workload.spec.template.spec;
      const spec = podSpec.containers.find((c: { name: string }) => c.name === name);
      const podName =
        workload.kind === 'StatefulSet' ? `${workload.metadata.name}-0` : `${workload.metadata.name}-${NODE_NAME}`;
      const serviceAccount = { namespace, name: podSpec.serviceAccountName as string };
      const fields: Record<string, string> = {
        'spec.nodeName': NODE_NAME,
        'metadata.name': podName,
        'metadata.namespace': namespace,
        'spec.serviceAccountName': serviceAccount.name,
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
      const portFor = async (port: number) => {
        let local = podPorts.get(port);
        if (local === undefined) {
          local = await freePort();
          podPorts.set(port, local);
        }
        return local;
      };
      const mapValue = async (flag: string, value: string) => {
        if (value.startsWith('unix://')) return `unix://${mapPath(value.slice('unix://'.length))}`;
        if (value.startsWith('/')) return mapPath(value);
        const hostPort = /^(?:[0-9.]*|localhost|\[::\]):(\d+)$/.exec(value);
        if (hostPort) return `127.0.0.1:${await portFor(Number(hostPort[1]))}`;
        if (/port/i.test(flag) && /^\d+$/.test(value) && declared.has(Number(value)))
          return String(await portFor(Number(value)));
        return value;
      };
      const expand = (s: string) => s.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (whole, v: string) => env[v] ?? whole);
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

    // ---- the driver: `cbt-csi serve` with the chart's args
    const driverView = await container('cbt-csi');
    const endpointArg = driverView.args.find((a) => a.startsWith('--endpoint='))!;
    const csiEndpoint = endpointArg.slice('--endpoint='.length);
    const stateDir = driverView.args.find((a) => a.startsWith('--state-dir='))!.slice('--state-dir='.length);
    const packageVersion = (
      JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string }
    ).version;
    const driver = startProcess(
      'cbt-csi',
      'cbt-csi (this repository, `cbt-csi serve` from source)',
      packageVersion,
      process.execPath,
      ['--import', TSX_LOADER, path.join(REPO_ROOT, 'src/cli.ts'), 'serve', ...driverView.args],
      driverView.env,
    );
    const identity = new ServiceClient(Identity, csiEndpoint);
    try {
      const deadline = Date.now() + 60_000;
      for (;;) {
        if (!alive(driver.child)) throw new Error(`cbt-csi serve exited:\n${tail(driver.log)}`);
        try {
          if ((await identity.call('probe', {}, { deadlineMs: 2_000 })).ready !== false) break;
        } catch {
          // not listening yet
        }
        if (Date.now() > deadline) throw new Error(`cbt-csi serve not ready after 60 s:\n${tail(driver.log)}`);
        await sleep(250);
      }
    } finally {
      identity.close();
    }

    took('cbt-csi serve ready');
    const cluster: HeadlessCluster = {
      dir,
      controlPlane,
      api,
      release,
      namespace,
      nodeName: NODE_NAME,
      values,
      objects,
      driverName,
      csiEndpoint,
      stateDir,
      startup,
      processes: () => [...procs],
      hostPath,
      container,
      serviceAccountToken,
      writeKubeconfig,
      async startSidecar(name, extraArgs = []) {
        const view = await container(name);
        const token = await serviceAccountToken(view.serviceAccount.namespace, view.serviceAccount.name);
        const kubeconfig = writeKubeconfig(`${name}-${view.serviceAccount.name}`, token);
        const [component, c] = componentOf(name);
        return startProcess(
          name,
          component,
          c.version,
          tool(name),
          [...view.args, `--kubeconfig=${kubeconfig}`, ...extraArgs],
          view.env,
        );
      },
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
      // In a pod the lease namespace defaults to the pod's; out of cluster it would be "default".
      `--leader-election-namespace=${controllerNamespace}`,
    ]);
    for (const sidecar of options.sidecars ?? []) await cluster.startSidecar(sidecar);
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
  for (const p of cluster.processes()) {
    if (p.name === 'cbt-csi') lines.push(line(p.name, 'cbt-csi', p.version, 'package.json (run from source by tsx)'));
    else lines.push(line(p.name, p.component, p.version, reportedVersion(p.name)));
    const args = p.name === 'cbt-csi' ? p.command.slice(p.command.indexOf('serve')) : p.command.slice(1);
    lines.push(`    ${args.join(' ').replaceAll(cluster.dir, '$DIR')}`);
  }
  return lines;
}
