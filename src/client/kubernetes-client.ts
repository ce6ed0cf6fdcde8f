/**
 * The snapshot metadata client in Kubernetes mode: snapshots are VolumeSnapshots of one namespace, named
 * by their object names. The Kubernetes SnapshotMetadata API takes the base of a delta as a CSI handle
 * (so the base VolumeSnapshot may already be gone); delta() looks the handle up from the base's name,
 * deltaFromHandle() takes it as it is, as a backup tool that kept it does.
 */
import { Code, ConnectError } from '@connectrpc/connect';
import { SnapshotMetadataError, typedError } from './errors.js';
import type { VolumeSnapshotFacts } from './kubernetes-transport.js';
import type { KubernetesTransport } from './kubernetes-transport.js';
import { SnapshotMetadataClient, type ResumeListener, type RetryPolicy } from './metadata-client.js';
import type { ExtentListing, ListOptions } from './types.js';

export class KubernetesSnapshotMetadataClient extends SnapshotMetadataClient {
  constructor(
    private readonly kubernetes: KubernetesTransport,
    options: { retry?: Partial<RetryPolicy>; onResume?: ResumeListener } = {},
  ) {
    super(kubernetes, options);
  }

  get namespace(): string {
    return this.kubernetes.namespace;
  }

  /** A VolumeSnapshot's CSI handle, driver and size; typed errors (NotFoundError, …) on failure. */
  async snapshot(name: string): Promise<VolumeSnapshotFacts> {
    try {
      return await this.kubernetes.snapshot(name);
    } catch (err) {
      // Not ready yet, or the API server unreachable: said as it is (nothing was retried here).
      if (err instanceof ConnectError && err.code === Code.Unavailable)
        throw new SnapshotMetadataError('UNAVAILABLE', err.rawMessage, err.rawMessage, { cause: err });
      throw typedError(err, `VolumeSnapshot ${this.namespace}/${name}`);
    }
  }

  /** The allocated extents of VolumeSnapshot `snapshotName`. */
  override allocated(snapshotName: string, options: ListOptions = {}): Promise<ExtentListing> {
    return super.allocated(snapshotName, options);
  }

  /** The extents changed from VolumeSnapshot `baseName` to VolumeSnapshot `targetName`. */
  override async delta(baseName: string, targetName: string, options: ListOptions = {}): Promise<ExtentListing> {
    const base = await this.snapshot(baseName);
    return super.delta(base.snapshotHandle, targetName, options);
  }

  /** The extents changed to VolumeSnapshot `targetName` from the snapshot whose CSI handle is `baseHandle`. */
  deltaFromHandle(baseHandle: string, targetName: string, options: ListOptions = {}): Promise<ExtentListing> {
    return super.delta(baseHandle, targetName, options);
  }
}
