/**
 * What `cbt-csi check --namespace` asks in Kubernetes mode: snapshots are VolumeSnapshots of one namespace,
 * their creation times are their contents' status.creationTime (the driver's own, copied there by
 * csi-snapshotter), and their extents come through the driver's csi-snapshot-metadata sidecar as the
 * caller's ServiceAccount, with the same client, resumes and typed errors a backup in a cluster has.
 */
import { connectKubernetes, type ResumeListener, type RetryPolicy } from '../client/index.js';
import type { MetadataReader, ReportedExtent } from './csi-metadata-reader.js';

export interface KubernetesReaderOptions {
  namespace: string;
  kubeconfig?: string;
  retry?: Partial<RetryPolicy>;
  onResume?: ResumeListener;
}

/** Snapshots are named by their VolumeSnapshot names in `options.namespace`. */
export function kubernetesMetadataReader(options: KubernetesReaderOptions): MetadataReader {
  const { retry, onResume, ...transport } = options;
  const client = connectKubernetes({ ...transport, retry, onResume });
  return {
    async snapshotCreatedAtMs(name) {
      const facts = await client.snapshot(name);
      if (facts.creationTimeMs === null)
        throw new Error(
          `VolumeSnapshotContent ${facts.contentName} of VolumeSnapshot ${options.namespace}/${name} has no status.creationTime: give --created-at`,
        );
      return facts.creationTimeMs;
    },
    async extents(name, baseName) {
      const listing = baseName === undefined ? await client.allocated(name) : await client.delta(baseName, name);
      const extents: ReportedExtent[] = [];
      for await (const e of listing) extents.push({ offset: e.offset, length: e.length });
      return { extents, resumes: listing.resumes };
    },
    close() {
      void client.close();
    },
  };
}
