/**
 * Several driver processes as the nodes of one cluster: each its own `cbt-csi serve` with its own state
 * directory, node ID, CSI socket and peer listener on loopback, all with static peer discovery and mutual
 * TLS from one test CA. A node can be killed (kill -9 as a crash) and started again on the same state.
 */
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Controller, GroupController, Identity, Node, SnapshotMetadata } from '../../../src/gen/csi/v1/csi_pb.js';
import { BlockStore } from '../../../storage-engine/index.js';
import { ServiceClient } from '../../support/csi-client.js';
import type { PeerCertFiles } from '../../support/peer-certs.js';
import { freePort } from '../../support/free-port.js';
import { spawnDriver } from '../../support/test-driver.js';

/** On a loaded machine (2 cores shared), a tsx-compiled driver can take a minute to start. */
const START_TIMEOUT_MS = 180_000;

export interface ClusterNode {
  readonly id: string;
  readonly stateDir: string;
  /** grpc-js target of its CSI socket. */
  readonly target: string;
  readonly peerPort: number;
  identity: ServiceClient<typeof Identity>;
  controller: ServiceClient<typeof Controller>;
  groups: ServiceClient<typeof GroupController>;
  metadata: ServiceClient<typeof SnapshotMetadata>;
  node: ServiceClient<typeof Node>;
  /** Its Prometheus endpoint (changes on restart). */
  metricsUrl(): string;
  stderr(): string;
  running(): boolean;
  /** Sends the signal and waits for the process to exit. */
  kill(signal: NodeJS.Signals): Promise<void>;
  /** Starts the driver again, on the same state directory, socket and ports. */
  start(): Promise<void>;
}

export interface Cluster {
  nodes: ClusterNode[];
  stop(): Promise<void>;
}

/** Starts one driver per node ID under `dir`, each knowing all the others as peers. */
export async function startCluster(dir: string, nodeIds: readonly string[], certs: PeerCertFiles): Promise<Cluster> {
  const ports = new Map<string, number>();
  for (const id of nodeIds) ports.set(id, await freePort());
  const peers = [...ports].map(([id, port]) => `${id}=127.0.0.1:${port}`).join(',');
  const nodes = nodeIds.map((id) => clusterNode(dir, id, ports.get(id)!, peers, certs));
  await Promise.all(nodes.map((n) => n.start()));
  return {
    nodes,
    async stop() {
      await Promise.all(nodes.map((n) => (n.running() ? n.kill('SIGTERM') : undefined)));
      for (const n of nodes) {
        n.identity.close();
        n.controller.close();
        n.groups.close();
        n.metadata.close();
        n.node.close();
      }
    },
  };
}

function clusterNode(dir: string, id: string, peerPort: number, peers: string, certs: PeerCertFiles): ClusterNode {
  const nodeDir = path.join(dir, id);
  fs.mkdirSync(nodeDir, { recursive: true });
  const socket = path.join(nodeDir, 'csi.sock');
  const stateDir = path.join(nodeDir, 'state');
  const target = `unix://${socket}`;
  const args = [
    ...['--endpoint', target, '--state-dir', stateDir, '--node-id', id, '--log-level', 'info'],
    ...['--metrics-address', '127.0.0.1:0', '--drain-timeout', '2'],
    ...['--peer-listen', `127.0.0.1:${peerPort}`, '--peers', peers],
    ...['--peer-tls-cert', certs.cert, '--peer-tls-key', certs.key, '--peer-tls-ca', certs.ca],
  ];
  let child: ChildProcess | undefined;
  let stderr = () => '';
  const node: ClusterNode = {
    id,
    stateDir,
    target,
    peerPort,
    identity: new ServiceClient(Identity, target),
    controller: new ServiceClient(Controller, target),
    groups: new ServiceClient(GroupController, target),
    metadata: new ServiceClient(SnapshotMetadata, target),
    node: new ServiceClient(Node, target),
    metricsUrl() {
      const m = /cbt-csi metrics at (\S+)/.exec(stderr());
      if (!m) throw new Error(`node ${id} printed no metrics URL`);
      return m[1]!;
    },
    stderr: () => stderr(),
    running: () => child !== undefined && child.exitCode === null && child.signalCode === null,
    async kill(signal) {
      const running = child;
      if (!running || running.exitCode !== null || running.signalCode !== null) return;
      const exited = new Promise<void>((resolve) => running.once('exit', () => resolve()));
      running.kill(signal);
      await exited;
    },
    async start() {
      const started = await spawnDriver(args, { startTimeoutMs: START_TIMEOUT_MS });
      child = started.child;
      stderr = started.stderr;
    },
  };
  return node;
}

/**
 * Writes blocks into a volume of a stopped node's store, as a pod's writes would arrive (the driver holds the
 * store while it runs). `volumeId` is the engine's ID (the handle without its owner suffix).
 */
export async function writeBlocks(
  stateDir: string,
  volumeId: string,
  writes: ReadonlyArray<{ offset: number; data: Buffer }>,
): Promise<void> {
  const store = BlockStore.open(path.join(stateDir, 'store'));
  try {
    for (const { offset, data } of writes) store.write(volumeId, offset, data);
    await store.flush(volumeId);
  } finally {
    await store.close();
  }
}
