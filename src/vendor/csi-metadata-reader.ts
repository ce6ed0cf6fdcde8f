/**
 * What `cbt-csi check` asks the driver: a snapshot's creation time (Controller ListSnapshots) and its
 * allocated or changed extents, read with the backup toolkit's client (src/client), so check sees the
 * driver exactly as a backup does: a cut stream is resumed, FAILED_PRECONDITION and the other codes a
 * retry cannot fix come back as the client's typed errors.
 */
import { createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { endpointSession } from '../client/csi-direct-transport.js';
import { CsiDirectTransport, SnapshotMetadataClient, type ResumeListener, type RetryPolicy } from '../client/index.js';
import { Controller } from '../gen/csi/v1/csi_pb.js';

export interface ReportedExtent {
  offset: number;
  length: number;
}

/** The extents of one listing, and how often the client had to resume it. */
export interface ReportedListing {
  extents: ReportedExtent[];
  resumes: number;
}

export interface MetadataReader {
  /** Milliseconds since the epoch at which the snapshot was cut. */
  snapshotCreatedAtMs(snapshotId: string): Promise<number>;
  /** Every extent of the allocated listing (base undefined) or the delta, in order, through the client. */
  extents(snapshotId: string, baseSnapshotId: string | undefined): Promise<ReportedListing>;
  close(): void;
}

export interface MetadataReaderOptions {
  retry?: Partial<RetryPolicy>;
  onResume?: ResumeListener;
}

/** `endpoint`: the driver's CSI endpoint, `unix:///path/csi.sock` (or a bare path) or `tcp://HOST:PORT`. */
export function csiMetadataReader(endpoint: string, options: MetadataReaderOptions = {}): MetadataReader {
  const session = endpointSession(endpoint);
  const controller = createClient(
    Controller,
    createGrpcTransport({ baseUrl: 'http://localhost', sessionManager: session }),
  );
  const client = new SnapshotMetadataClient(new CsiDirectTransport(endpoint), options);
  return {
    async snapshotCreatedAtMs(snapshotId) {
      const res = await controller.listSnapshots({ snapshotId });
      const created = res.entries[0]?.snapshot?.creationTime;
      if (!created) throw new Error(`the driver lists no snapshot ${snapshotId}`);
      return Number(created.seconds) * 1000 + Math.floor(created.nanos / 1e6);
    },
    async extents(snapshotId, baseSnapshotId) {
      const listing =
        baseSnapshotId === undefined
          ? await client.allocated(snapshotId)
          : await client.delta(baseSnapshotId, snapshotId);
      const extents: ReportedExtent[] = [];
      for await (const e of listing) extents.push({ offset: e.offset, length: e.length });
      return { extents, resumes: listing.resumes };
    },
    close() {
      session.abort();
      void client.close();
    },
  };
}
