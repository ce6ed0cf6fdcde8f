/**
 * cbt-csi/client: list the allocated and changed extents of CSI snapshots, for backup tools.
 *
 *   const client = connectCsiDirect('unix:///var/lib/cbt/csi.sock');
 *   const listing = await client.delta(baseSnapshotId, targetSnapshotId, { blockSize: 1 << 20 });
 *   for await (const { offset, length } of listing) copy(offset, length);
 *
 * In a cluster, through the csi-snapshot-metadata sidecar, with VolumeSnapshot names:
 *
 *   const client = connectKubernetes({ namespace: 'apps' });
 *   const listing = await client.delta('data-monday', 'data-tuesday');
 */
import { CsiDirectTransport } from './csi-direct-transport.js';
import { KubernetesSnapshotMetadataClient } from './kubernetes-client.js';
import { KubernetesTransport, type KubernetesTransportOptions } from './kubernetes-transport.js';
import { SnapshotMetadataClient, type ResumeListener, type RetryPolicy } from './metadata-client.js';

export * from './types.js';
export * from './errors.js';
export {
  SnapshotMetadataClient,
  DEFAULT_RETRY,
  rechunk,
  type RetryPolicy,
  type ResumeListener,
} from './metadata-client.js';
export { CsiDirectTransport } from './csi-direct-transport.js';
export { KubernetesSnapshotMetadataClient } from './kubernetes-client.js';
export {
  KubernetesTransport,
  type KubernetesTransportOptions,
  type VolumeSnapshotFacts,
} from './kubernetes-transport.js';

/** A client talking to the driver's own socket (`unix:///path/csi.sock` or `tcp://127.0.0.1:PORT`). */
export function connectCsiDirect(
  endpoint: string,
  options: { retry?: Partial<RetryPolicy>; onResume?: ResumeListener } = {},
): SnapshotMetadataClient {
  return new SnapshotMetadataClient(new CsiDirectTransport(endpoint), options);
}

/**
 * A client talking to the csi-snapshot-metadata sidecar of the snapshots' driver, as the caller's own
 * ServiceAccount (from the kubeconfig, or the pod's), about VolumeSnapshots of `options.namespace`.
 */
export function connectKubernetes(
  options: KubernetesTransportOptions & { retry?: Partial<RetryPolicy>; onResume?: ResumeListener },
): KubernetesSnapshotMetadataClient {
  const { retry, onResume, ...transport } = options;
  return new KubernetesSnapshotMetadataClient(new KubernetesTransport(transport), { retry, onResume });
}
