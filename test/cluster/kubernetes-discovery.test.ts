/**
 * Peer discovery in Kubernetes (`--peer-discovery kubernetes`) against a real kube-apiserver: the plugin
 * pods by label, spec.nodeName → status.podIP, with the chart's own RBAC (a ServiceAccount token bound to
 * the Role `helm template` renders). No kubelet runs: the test writes the pods' status as kubelet would.
 * Then two driver processes find each other that way and forward, including after one moves to a new IP.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { KubeConfig } from '@kubernetes/client-node';
import { parseAllDocuments, stringify } from 'yaml';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { KubernetesPeerDirectory } from '../../src/cluster/kubernetes-directory.js';
import { createLogger } from '../../src/logging.js';
import { Controller, SnapshotMetadata, VolumeCapability_AccessMode_Mode } from '../../src/gen/csi/v1/csi_pb.js';
import { startControlPlane, type ControlPlane } from '../ecosystem/support/control-plane.js';
import { missingTools, suiteUnless, tool } from '../ecosystem/tools.js';
import { type RpcError, ServiceClient } from '../support/csi-client.js';
import { freePort } from '../support/free-port.js';
import { makePeerCerts, missingOpenssl } from '../support/peer-certs.js';
import { REPO_ROOT, spawnDriver } from '../support/test-driver.js';

const NAMESPACE = 'cbt-system';
const RELEASE = 'cbt-csi';
const SELECTOR = 'app.kubernetes.io/name=cbt-csi,app.kubernetes.io/instance=cbt-csi,app.kubernetes.io/component=plugin';
const LABELS = Object.fromEntries(SELECTOR.split(',').map((kv) => kv.split('=') as [string, string]));

const missing = missingTools(['helm', 'etcd', 'kube-apiserver', 'kubectl']) ?? missingOpenssl();

suiteUnless(missing, 'multi-node: peer discovery through the Kubernetes API', () => {
  let cp: ControlPlane;
  let dir: string;
  /** A kubeconfig with the token of the chart's ServiceAccount (the chart's Role, nothing else). */
  let driverKubeconfig: string;
  const children: Array<{ kill(): Promise<void> }> = [];

  const kubeConfigFile = (user: string, token: string) => {
    const admin = new KubeConfig();
    admin.loadFromFile(cp.kubeconfig);
    const cluster = admin.getCurrentCluster()!;
    const file = path.join(dir, `${user}.kubeconfig`);
    fs.writeFileSync(
      file,
      stringify({
        apiVersion: 'v1',
        kind: 'Config',
        clusters: [{ name: 'test', cluster: { server: cluster.server, 'certificate-authority': cluster.caFile } }],
        users: [{ name: user, user: { token } }],
        contexts: [{ name: 'test', context: { cluster: 'test', user, namespace: NAMESPACE } }],
        'current-context': 'test',
      }),
      { mode: 0o600 },
    );
    return file;
  };

  /** A plugin pod as the DaemonSet makes it, bound to a node, with the status kubelet would report. */
  const runPod = (name: string, node: string, ip: string | undefined, labels: Record<string, string> = LABELS) => {
    cp.kubectl(['-n', NAMESPACE, 'apply', '-f', '-'], {
      input: stringify({
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name, labels },
        spec: { nodeName: node, containers: [{ name: 'cbt-csi', image: 'cbt-csi:test' }] },
      }),
    });
    const status = ip
      ? { phase: 'Running', podIP: ip, podIPs: [{ ip }], startTime: new Date().toISOString() }
      : { phase: 'Pending' };
    cp.kubectl([
      '-n',
      NAMESPACE,
      'patch',
      'pod',
      name,
      '--subresource=status',
      '--type=merge',
      '-p',
      JSON.stringify({ status }),
    ]);
  };

  const directory = (kubeconfig: string) => {
    const kubeConfig = new KubeConfig();
    kubeConfig.loadFromFile(kubeconfig);
    return new KubernetesPeerDirectory(
      { namespace: NAMESPACE, podSelector: SELECTOR, port: 9820, cacheMs: 60_000, minRelistMs: 0, kubeConfig },
      createLogger('silent'),
    );
  };

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-k8s-discovery-'));
    cp = await startControlPlane();
    cp.kubectl(['create', 'namespace', NAMESPACE]);
    // The chart's ServiceAccount and the driver's Role and RoleBinding, as helm renders them in mode daemonset.
    const rendered = spawnSync(
      tool('helm'),
      [
        'template',
        RELEASE,
        path.join(REPO_ROOT, 'charts/cbt-csi'),
        '--namespace',
        NAMESPACE,
        '--set',
        'mode=daemonset',
      ],
      {
        encoding: 'utf8',
        env: { ...process.env, HELM_CACHE_HOME: path.join(dir, 'hc'), HELM_CONFIG_HOME: path.join(dir, 'hf') },
      },
    );
    expect(rendered.status, rendered.stderr).toBe(0);
    const objects = parseAllDocuments(rendered.stdout)
      .map((d) => d.toJS() as { kind: string; metadata: { name: string } } | null)
      .filter((o) => o !== null);
    const driverRbac = objects.filter(
      (o) =>
        (o.kind === 'ServiceAccount' && o.metadata.name === RELEASE) ||
        ((o.kind === 'Role' || o.kind === 'RoleBinding') && o.metadata.name === `${RELEASE}-driver`),
    );
    expect(driverRbac.map((o) => o.kind).sort()).toEqual(['Role', 'RoleBinding', 'ServiceAccount']);
    cp.kubectl(['apply', '-f', '-'], { input: driverRbac.map((o) => stringify(o)).join('---\n') });
    const token = cp.kubectl(['-n', NAMESPACE, 'create', 'token', RELEASE]).stdout.trim();
    driverKubeconfig = kubeConfigFile('driver', token);
  }, 300_000);

  afterAll(async () => {
    for (const c of children) await c.kill();
    await cp?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  }, 120_000);

  it("maps each node to its running plugin pod's IP, with the chart's Role", async () => {
    runPod('plugin-a', 'node-a', '10.1.0.1');
    runPod('plugin-b', 'node-b', 'fd00::2');
    runPod('plugin-c', 'node-c', undefined);
    runPod('something-else', 'node-d', '10.1.0.4', { app: 'other' });
    const peers = directory(driverKubeconfig);
    expect(await peers.lookup('node-a')).toBe('10.1.0.1:9820');
    expect(await peers.lookup('node-b')).toBe('[fd00::2]:9820');
    // Not running yet, or not a plugin pod: no driver known there.
    expect(await peers.lookup('node-c')).toBeUndefined();
    expect(await peers.lookup('node-d')).toBeUndefined();

    // A pod being deleted (no kubelet here confirms it, so it stays, marked) is no longer used; its replacement is.
    cp.kubectl(['-n', NAMESPACE, 'delete', 'pod', 'plugin-a', '--wait=false']);
    expect(cp.kubectl(['-n', NAMESPACE, 'get', 'pod', 'plugin-a', '-o', 'name']).stdout.trim()).toBe('pod/plugin-a');
    peers.invalidate('node-a');
    expect(await peers.lookup('node-a')).toBeUndefined();
    runPod('plugin-a2', 'node-a', '10.1.0.11');
    expect(await peers.lookup('node-a')).toBe('10.1.0.11:9820');
  });

  it('finds nothing without the Role: the chart grants what discovery needs, no more is used', async () => {
    cp.kubectl(['-n', NAMESPACE, 'create', 'serviceaccount', 'nobody']);
    const token = cp.kubectl(['-n', NAMESPACE, 'create', 'token', 'nobody']).stdout.trim();
    expect(await directory(kubeConfigFile('nobody', token)).lookup('node-b')).toBeUndefined();
  });

  it('two drivers find each other through the API and forward; a driver on a new pod IP is found again', async () => {
    const certs = makePeerCerts(path.join(dir, 'certs')).valid;
    const port = await freePort();
    // Loopback has all of 127/8: each "pod" gets its own address, every one the same peer port, as in a cluster.
    const start = async (node: string, ip: string) => {
      const nodeDir = path.join(dir, node);
      const socket = path.join(nodeDir, 'csi.sock');
      const args = [
        ...['--endpoint', `unix://${socket}`, '--state-dir', path.join(nodeDir, 'state'), '--node-id', node],
        ...['--peer-listen', `${ip}:${port}`, '--peer-discovery', 'kubernetes'],
        ...['--peer-pod-selector', SELECTOR, '--peer-namespace', NAMESPACE],
        ...['--peer-tls-cert', certs.cert, '--peer-tls-key', certs.key, '--peer-tls-ca', certs.ca],
      ];
      const { child } = await spawnDriver(args, { env: { KUBECONFIG: driverKubeconfig }, startTimeoutMs: 180_000 });
      const handle = {
        async kill() {
          if (child.exitCode !== null || child.signalCode !== null) return;
          const exited = new Promise((r) => child.once('exit', r));
          child.kill('SIGKILL');
          await exited;
        },
      };
      children.push(handle);
      return { target: `unix://${socket}`, ...handle };
    };
    runPod('plugin-x', 'node-x', '127.0.0.2');
    runPod('plugin-y', 'node-y', '127.0.0.3');
    let x = await start('node-x', '127.0.0.2');
    const y = await start('node-y', '127.0.0.3');
    const onX = new ServiceClient(Controller, x.target);
    const viaY = new ServiceClient(SnapshotMetadata, y.target);
    try {
      const volume = (
        await onX.call('createVolume', {
          name: 'pvc-x',
          capacityRange: { requiredBytes: 1n << 24n },
          volumeCapabilities: [
            {
              accessType: { case: 'block', value: {} },
              accessMode: { mode: VolumeCapability_AccessMode_Mode.SINGLE_NODE_WRITER },
            },
          ],
        })
      ).volume!;
      const snapshot = (await onX.call('createSnapshot', { sourceVolumeId: volume.volumeId, name: 'snap-x' }))
        .snapshot!;
      expect(snapshot.snapshotId.endsWith('@node-x')).toBe(true);
      const answer = await viaY.collect('getMetadataAllocated', { snapshotId: snapshot.snapshotId });
      expect(answer[0]!.volumeCapacityBytes).toBe(1n << 24n);

      // node-x's plugin pod is replaced: a new pod with a new IP, the old one being deleted.
      onX.close();
      await x.kill();
      cp.kubectl(['-n', NAMESPACE, 'delete', 'pod', 'plugin-x', '--wait=false']);
      runPod('plugin-x2', 'node-x', '127.0.0.4');
      x = await start('node-x', '127.0.0.4');
      // The first call may still go to the old address (UNAVAILABLE, and the list is read again); then it works.
      const deadline = Date.now() + 30_000;
      for (;;) {
        try {
          await viaY.collect('getMetadataAllocated', { snapshotId: snapshot.snapshotId });
          break;
        } catch (err) {
          expect((err as RpcError).code).toBe(grpc.status.UNAVAILABLE);
          if (Date.now() > deadline) throw err;
          await new Promise((r) => setTimeout(r, 500));
        }
      }
    } finally {
      onX.close();
      viaY.close();
    }
  });
});
