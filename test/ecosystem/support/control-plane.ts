/**
 * A Kubernetes control plane with no nodes: etcd and kube-apiserver (the pinned builds) on loopback
 * ports, with RBAC on, a static admin token, and ServiceAccount token signing, started and stopped by a
 * test. kubectl talks to it through a kubeconfig in the control plane's temp directory.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { COMPONENTS, tool } from '../tools.js';

export interface ControlPlane {
  dir: string;
  kubeconfig: string;
  server: string;
  /** The admin's bearer token (group system:masters) and the API server's CA file, for REST clients. */
  adminToken: string;
  caFile: string;
  /** Runs kubectl against the API server; throws with its output unless it exits 0 (or `allowFail`). */
  kubectl(
    args: string[],
    options?: { input?: string; allowFail?: boolean },
  ): { status: number; stdout: string; stderr: string };
  /** Stops the API server and etcd (SIGTERM, then SIGKILL) and removes the temp dir. */
  stop(): Promise<void>;
}

/** A TCP port free on 127.0.0.1 right now. */
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

function startProcess(file: string, args: string[], logFile: string): ChildProcess {
  const log = fs.openSync(logFile, 'a');
  const child = spawn(file, args, { stdio: ['ignore', log, log] });
  fs.closeSync(log);
  return child;
}

async function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export async function startControlPlane(): Promise<ControlPlane> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-control-plane-'));
  const children: ChildProcess[] = [];
  const stop = async () => {
    for (const child of children.reverse()) await stopProcess(child);
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    const [etcdClient, etcdPeer, apiPort] = [await freePort(), await freePort(), await freePort()];
    const etcdUrl = `http://127.0.0.1:${etcdClient}`;
    const peerUrl = `http://127.0.0.1:${etcdPeer}`;
    const etcd = startProcess(
      tool('etcd'),
      [
        `--data-dir=${path.join(dir, 'etcd')}`,
        `--listen-client-urls=${etcdUrl}`,
        `--advertise-client-urls=${etcdUrl}`,
        `--listen-peer-urls=${peerUrl}`,
        `--initial-advertise-peer-urls=${peerUrl}`,
        `--initial-cluster=default=${peerUrl}`,
        // Test data: nothing here must survive a crash.
        '--unsafe-no-fsync',
        '--log-level=warn',
      ],
      path.join(dir, 'etcd.log'),
    );
    children.push(etcd);

    const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    fs.writeFileSync(path.join(dir, 'sa.key'), privateKey.export({ type: 'pkcs1', format: 'pem' }), { mode: 0o600 });
    fs.writeFileSync(path.join(dir, 'sa.pub'), publicKey.export({ type: 'spki', format: 'pem' }));
    const token = randomBytes(24).toString('hex');
    fs.writeFileSync(path.join(dir, 'tokens.csv'), `${token},admin,admin,system:masters\n`, { mode: 0o600 });
    const certDir = path.join(dir, 'certs');
    const apiserver = startProcess(
      tool('kube-apiserver'),
      [
        `--etcd-servers=${etcdUrl}`,
        '--bind-address=127.0.0.1',
        '--advertise-address=127.0.0.1',
        `--secure-port=${apiPort}`,
        `--cert-dir=${certDir}`,
        `--token-auth-file=${path.join(dir, 'tokens.csv')}`,
        '--authorization-mode=RBAC',
        '--service-account-issuer=https://kubernetes.default.svc',
        `--service-account-key-file=${path.join(dir, 'sa.pub')}`,
        `--service-account-signing-key-file=${path.join(dir, 'sa.key')}`,
        // An address range the API server allocates Service IPs from; nothing is ever routed to it.
        '--service-cluster-ip-range=10.96.0.0/16',
        // The plugin pod is privileged, as every CSI node plugin is.
        '--allow-privileged=true',
        // No controller-manager creates ServiceAccount tokens or default ServiceAccounts here.
        '--disable-admission-plugins=ServiceAccount',
      ],
      path.join(dir, 'kube-apiserver.log'),
    );
    children.push(apiserver);

    const server = `https://127.0.0.1:${apiPort}`;
    const kubeconfig = path.join(dir, 'kubeconfig');
    const kubectl: ControlPlane['kubectl'] = (args, options = {}) => {
      const r = spawnSync(tool('kubectl'), [`--kubeconfig=${kubeconfig}`, ...args], {
        encoding: 'utf8',
        input: options.input,
        timeout: 120_000,
      });
      const result = { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? r.error?.message ?? '' };
      if (result.status !== 0 && !options.allowFail)
        throw new Error(`kubectl ${args.join(' ')} (exit ${result.status}):\n${result.stderr}${result.stdout}`);
      return result;
    };

    // The API server writes its self-signed serving certificate (also its own CA) at start.
    const deadline = Date.now() + 180_000;
    for (;;) {
      for (const child of children) {
        if (child.exitCode !== null) {
          const logName = child === etcd ? 'etcd.log' : 'kube-apiserver.log';
          throw new Error(
            `${logName.replace('.log', '')} exited with ${child.exitCode}:\n${fs.readFileSync(path.join(dir, logName), 'utf8').slice(-4000)}`,
          );
        }
      }
      const ca = path.join(certDir, 'apiserver.crt');
      if (fs.existsSync(ca) && !fs.existsSync(kubeconfig)) {
        fs.writeFileSync(
          kubeconfig,
          [
            'apiVersion: v1',
            'kind: Config',
            `clusters: [{name: test, cluster: {server: "${server}", certificate-authority: "${ca}"}}]`,
            `users: [{name: admin, user: {token: "${token}"}}]`,
            'contexts: [{name: test, context: {cluster: test, user: admin}}]',
            'current-context: test',
            '',
          ].join('\n'),
          { mode: 0o600 },
        );
      }
      if (fs.existsSync(kubeconfig) && kubectl(['get', '--raw', '/readyz'], { allowFail: true }).status === 0) break;
      if (Date.now() > deadline)
        throw new Error(
          `kube-apiserver not ready after 180 s:\n${fs.readFileSync(path.join(dir, 'kube-apiserver.log'), 'utf8').slice(-4000)}`,
        );
      await sleep(500);
    }
    return { dir, kubeconfig, server, adminToken: token, caFile: path.join(certDir, 'apiserver.crt'), kubectl, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/**
 * The CRDs the chart's objects need, from the Go module cache (scripts/ecosystem/build.sh downloads the
 * modules; GOPROXY=off here, so a test never reaches the network): VolumeSnapshot and group snapshot
 * CRDs of external-snapshotter's client module, the SnapshotMetadataService CRD of
 * external-snapshot-metadata's client module (versions.json says which version and why).
 */
export function crdFiles(): string[] {
  const files: string[] = [];
  for (const name of ['external-snapshotter', 'external-snapshot-metadata']) {
    const crds = COMPONENTS[name]!.crds!;
    const r = spawnSync('go', ['mod', 'download', '-json', `${crds.module}@${crds.version}`], {
      encoding: 'utf8',
      env: { ...process.env, GOPROXY: 'off', GOFLAGS: '-mod=mod' },
    });
    if (r.status !== 0)
      throw new Error(
        `go mod download ${crds.module}@${crds.version} (run scripts/ecosystem/build.sh): ${r.stdout}${r.stderr}`,
      );
    const crdDir = path.join((JSON.parse(r.stdout) as { Dir: string }).Dir, crds.dir);
    files.push(
      ...fs
        .readdirSync(crdDir)
        .filter((f) => f.endsWith('.yaml') && f !== 'kustomization.yaml')
        .map((f) => path.join(crdDir, f)),
    );
  }
  return files;
}
