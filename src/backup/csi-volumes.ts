/**
 * What the backup commands ask of the driver besides metadata, in CSI-direct mode: who a snapshot belongs
 * to, and a readable copy of it. The copy is a volume created from the snapshot (constant time in this
 * driver), staged and published as a block device through the Node service, as kubelet would; release()
 * takes it all down again, and is called on success, on errors and on Ctrl-C.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { Code, ConnectError, createClient, type Client } from '@connectrpc/connect';
import { createGrpcTransport, type Http2SessionManager } from '@connectrpc/connect-node';
import { Controller, Node, VolumeCapability_AccessMode_Mode as AccessMode } from '../gen/csi/v1/csi_pb.js';
import { endpointSession } from '../client/csi-direct-transport.js';
import { RepositoryError } from './repository.js';

export interface SnapshotFacts {
  id: string;
  sourceVolume: string;
  sizeBytes: number;
}

/** A published block device holding a copy of a snapshot. */
export interface ExposedSnapshot {
  device: string;
  volumeId: string;
  release(): Promise<void>;
}

export const BLOCK_CAPABILITY = {
  accessType: { case: 'block' as const, value: {} },
  accessMode: { mode: AccessMode.SINGLE_NODE_WRITER },
};

export class CsiVolumes {
  private readonly session: Http2SessionManager;
  readonly controller: Client<typeof Controller>;
  readonly node: Client<typeof Node>;

  constructor(readonly endpoint: string) {
    this.session = endpointSession(endpoint);
    const transport = createGrpcTransport({ baseUrl: 'http://localhost', sessionManager: this.session });
    this.controller = createClient(Controller, transport);
    this.node = createClient(Node, transport);
  }

  close(): void {
    this.session.abort();
  }

  /** The snapshot's volume and size; an unknown snapshot is a usage error. */
  async snapshot(id: string): Promise<SnapshotFacts> {
    if (!id) throw new RepositoryError('usage', 'a snapshot ID is required');
    const res = await this.controller.listSnapshots({ snapshotId: id }, { timeoutMs: 30_000 }).catch((err: unknown) => {
      throw unreachable(err, this.endpoint);
    });
    const snap = res.entries[0]?.snapshot;
    if (!snap) throw new RepositoryError('usage', `snapshot ${id} does not exist on the driver at ${this.endpoint}`);
    return { id, sourceVolume: snap.sourceVolumeId, sizeBytes: Number(snap.sizeBytes) };
  }

  /**
   * Creates a volume from the snapshot and publishes it as a block device under a private temp dir.
   * Needs root (the Node service makes loop devices); without it, says so.
   */
  async expose(snapshot: SnapshotFacts, signal?: AbortSignal): Promise<ExposedSnapshot> {
    requireRoot('reading a snapshot without --source', 'or give --source DEVICE|FILE holding the snapshot');
    signal?.throwIfAborted();
    const name = `cbt-backup-${randomBytes(6).toString('hex')}`;
    const created = await this.controller.createVolume({
      name,
      capacityRange: { requiredBytes: BigInt(snapshot.sizeBytes) },
      volumeCapabilities: [BLOCK_CAPABILITY],
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snapshot.id } } },
    });
    const volumeId = created.volume!.volumeId;
    return this.publish(volumeId, signal, () => this.controller.deleteVolume({ volumeId }));
  }

  /**
   * Stages and publishes a volume as a block device under a private temp dir, as kubelet would. release()
   * unpublishes, unstages, then runs `andThen` (e.g. deleting the volume).
   */
  async publish(volumeId: string, signal?: AbortSignal, andThen?: () => Promise<unknown>): Promise<ExposedSnapshot> {
    const steps: (() => Promise<unknown>)[] = [];
    if (andThen) steps.push(andThen);
    let dir: string | undefined;
    const release = async () => {
      // Newest first; each step runs even if an earlier one failed, so as much as possible is taken down.
      const errors: unknown[] = [];
      for (const step of steps.reverse()) await step().catch((err: unknown) => errors.push(err));
      steps.length = 0;
      if (dir) await fs.promises.rm(dir, { recursive: true, force: true }).catch(() => undefined);
      if (errors.length > 0)
        throw new Error(`cleaning up the temporary volume ${volumeId} failed: ${String(errors[0])}`);
    };
    try {
      dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'cbt-backup-'));
      const staging = path.join(dir, 'staging');
      const device = path.join(dir, 'device');
      await fs.promises.mkdir(staging, { mode: 0o700 });
      // The calls are not cancelled by `signal`: a cancelled call may still finish on the driver after
      // the clean-up ran. Each step completes, is recorded for release(), and only then is the signal checked.
      signal?.throwIfAborted();
      await this.node.nodeStageVolume({ volumeId, stagingTargetPath: staging, volumeCapability: BLOCK_CAPABILITY });
      steps.push(() => this.node.nodeUnstageVolume({ volumeId, stagingTargetPath: staging }));
      signal?.throwIfAborted();
      await this.node.nodePublishVolume({
        volumeId,
        stagingTargetPath: staging,
        targetPath: device,
        volumeCapability: BLOCK_CAPABILITY,
      });
      steps.push(() => this.node.nodeUnpublishVolume({ volumeId, targetPath: device }));
      signal?.throwIfAborted();
      return { device, volumeId, release };
    } catch (err) {
      await release().catch(() => undefined);
      if (err instanceof ConnectError && err.code === Code.Unimplemented) {
        throw new RepositoryError(
          'usage',
          `the driver at ${this.endpoint} serves no Node service (is it --role controller?): give --source DEVICE|FILE instead`,
        );
      }
      throw err;
    }
  }
}

/** Throws a usage error saying why root is needed and what to do instead. */
export function requireRoot(what: string, instead: string): void {
  if (process.getuid?.() === 0) return;
  throw new RepositoryError(
    'usage',
    `${what} needs root: the Node service publishes volumes as block devices (loop devices over FUSE, /dev/fuse), which only root may do. Run it as root (sudo), ${instead}`,
  );
}

/** A driver that cannot be reached is the caller's to fix (endpoint), said in one line. */
export function unreachable(err: unknown, endpoint: string): Error {
  // A socket that is not there, or nobody listening, comes back as INTERNAL with the connect error as cause.
  const refused = ['ENOENT', 'ECONNREFUSED', 'EACCES', 'ENOTSOCK'].includes(
    ((err as { cause?: NodeJS.ErrnoException } | undefined)?.cause?.code as string | undefined) ?? '',
  );
  if (err instanceof ConnectError && (err.code === Code.Unavailable || refused)) {
    return new RepositoryError('usage', `no driver answers at ${endpoint}: ${err.rawMessage}`);
  }
  return err instanceof Error ? err : new Error(String(err));
}
