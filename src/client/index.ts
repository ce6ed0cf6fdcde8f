/**
 * cbt-csi/client: list the allocated and changed extents of CSI snapshots, for backup tools.
 *
 *   const client = connectCsiDirect('unix:///var/lib/cbt/csi.sock');
 *   const listing = await client.delta(baseSnapshotId, targetSnapshotId, { blockSize: 1 << 20 });
 *   for await (const { offset, length } of listing) copy(offset, length);
 */
import { CsiDirectTransport } from './csi-direct-transport.js';
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

/** A client talking to the driver's own socket (`unix:///path/csi.sock` or `tcp://127.0.0.1:PORT`). */
export function connectCsiDirect(
  endpoint: string,
  options: { retry?: Partial<RetryPolicy>; onResume?: ResumeListener } = {},
): SnapshotMetadataClient {
  return new SnapshotMetadataClient(new CsiDirectTransport(endpoint), options);
}
