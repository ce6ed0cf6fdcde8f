/**
 * What `cbt-csi check` asks the driver, in one small file so it can later be swapped for the backup
 * toolkit's client: a snapshot's creation time (ListSnapshots) and its allocated or changed extents
 * (SnapshotMetadata), over CSI on the driver's unix socket with connect-node's gRPC transport.
 */
import net from 'node:net';
import { createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { Controller, SnapshotMetadata } from '../gen/csi/v1/csi_pb.js';

export interface ReportedExtent {
  offset: number;
  length: number;
}

export interface MetadataReader {
  /** Milliseconds since the epoch at which the snapshot was cut. */
  snapshotCreatedAtMs(snapshotId: string): Promise<number>;
  /** Every tuple of GetMetadataAllocated (base undefined) or GetMetadataDelta, in stream order. */
  extents(snapshotId: string, baseSnapshotId: string | undefined): Promise<ReportedExtent[]>;
  close(): void;
}

/** `socketPath`: the driver's CSI socket (unix). */
export function csiMetadataReader(socketPath: string): MetadataReader {
  const transport = createGrpcTransport({
    baseUrl: 'http://localhost',
    nodeOptions: { createConnection: () => net.connect(socketPath) },
  });
  const controller = createClient(Controller, transport);
  const metadata = createClient(SnapshotMetadata, transport);
  return {
    async snapshotCreatedAtMs(snapshotId) {
      const res = await controller.listSnapshots({ snapshotId });
      const created = res.entries[0]?.snapshot?.creationTime;
      if (!created) throw new Error(`the driver lists no snapshot ${snapshotId}`);
      return Number(created.seconds) * 1000 + Math.floor(created.nanos / 1e6);
    },
    async extents(snapshotId, baseSnapshotId) {
      const stream =
        baseSnapshotId === undefined
          ? metadata.getMetadataAllocated({ snapshotId })
          : metadata.getMetadataDelta({ baseSnapshotId, targetSnapshotId: snapshotId });
      const out: ReportedExtent[] = [];
      for await (const message of stream) {
        for (const b of message.blockMetadata) out.push({ offset: Number(b.byteOffset), length: Number(b.sizeBytes) });
      }
      return out;
    },
    close() {
      // Sessions of the transport close when idle; nothing holds the process open.
    },
  };
}
