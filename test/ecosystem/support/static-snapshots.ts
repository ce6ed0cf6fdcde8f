/**
 * VolumeSnapshots of snapshots cut directly through the driver's CSI socket, made the way a cluster
 * admin imports an existing snapshot: a pre-provisioned VolumeSnapshotContent (spec.source.snapshotHandle)
 * and a VolumeSnapshot bound to it by name. Their status is then set as snapshot-controller sets it once
 * it has checked the snapshot (readyToUse, snapshotHandle, boundVolumeSnapshotContentName, restoreSize),
 * through the status subresource. No controller runs here, so nothing else touches them.
 */
import type { ControlPlane } from './control-plane.js';

export interface StaticSnapshot {
  namespace: string;
  name: string;
  contentName: string;
  snapshotHandle: string;
}

export function createStaticSnapshot(
  cp: ControlPlane,
  s: {
    namespace: string;
    name: string;
    driver: string;
    snapshotHandle: string;
    sizeBytes: number;
    className: string;
    /**
     * When the driver cut it, as its ListSnapshots says: csi-snapshotter copies that into an imported
     * content's status.creationTime. Default: now.
     */
    createdAtMs?: number;
  },
): StaticSnapshot {
  const contentName = `imported-${s.namespace}-${s.name}`;
  const content = {
    apiVersion: 'snapshot.storage.k8s.io/v1',
    kind: 'VolumeSnapshotContent',
    metadata: { name: contentName },
    spec: {
      // Retain: the test deletes the driver's snapshots itself; no snapshotter runs to do it.
      deletionPolicy: 'Retain',
      driver: s.driver,
      source: { snapshotHandle: s.snapshotHandle },
      volumeSnapshotClassName: s.className,
      volumeSnapshotRef: { name: s.name, namespace: s.namespace },
    },
  };
  const snapshot = {
    apiVersion: 'snapshot.storage.k8s.io/v1',
    kind: 'VolumeSnapshot',
    metadata: { name: s.name, namespace: s.namespace },
    spec: { volumeSnapshotClassName: s.className, source: { volumeSnapshotContentName: contentName } },
  };
  cp.kubectl(['apply', '-f', '-'], {
    input: JSON.stringify({ apiVersion: 'v1', kind: 'List', items: [content, snapshot] }),
  });
  const now = new Date(s.createdAtMs ?? Date.now());
  cp.kubectl([
    'patch',
    'volumesnapshotcontent',
    contentName,
    '--subresource=status',
    '--type=merge',
    '-p',
    JSON.stringify({
      status: {
        snapshotHandle: s.snapshotHandle,
        readyToUse: true,
        restoreSize: s.sizeBytes,
        creationTime: now.getTime() * 1e6,
      },
    }),
  ]);
  cp.kubectl([
    'patch',
    'volumesnapshot',
    s.name,
    '-n',
    s.namespace,
    '--subresource=status',
    '--type=merge',
    '-p',
    JSON.stringify({
      status: {
        boundVolumeSnapshotContentName: contentName,
        readyToUse: true,
        restoreSize: String(s.sizeBytes),
        creationTime: now.toISOString().replace(/\.\d+Z$/, 'Z'),
      },
    }),
  ]);
  return { namespace: s.namespace, name: s.name, contentName, snapshotHandle: s.snapshotHandle };
}
