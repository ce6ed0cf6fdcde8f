/**
 * The node plugin's one FUSE mount (<stateDir>/fuse) and the volume files in it. The mount is made on
 * first use, so a driver that never stages a volume (a controller, a test of the control plane) needs
 * neither root nor /dev/fuse; a mount left behind by a killed instance is removed at start.
 *
 * Every mount has a generation: a loop device attached to a file of one generation stays bound to that
 * connection forever, so a device whose generation is not the live one can only return I/O errors.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { BlockStore } from '../../storage-engine/index.js';
import type { Logger } from '../logging.js';
import { FuseServer } from './fuse/fuse-server.js';
import { cleanStaleFuseMounts } from './fuse/mount.js';
import { VolumeFiles } from './fuse/volume-files.js';
import { IoLimiter, fuseIoAdmission, ioLimitsOf } from './io-limiter.js';

/** A volume file, and the generation of the mount it is in. */
export interface ExposedFile {
  path: string;
  generation: string;
}

export class VolumeExporter {
  private server: FuseServer | undefined;
  private files: VolumeFiles | undefined;
  private currentGeneration: string | undefined;
  private starting: Promise<void> | undefined;
  private stopped = false;
  /** maxIops / maxBandwidth of the exposed volumes, read from their attributes in the store. */
  readonly limiter: IoLimiter;

  constructor(
    private readonly store: BlockStore,
    /** The mount point; created if missing. */
    readonly mountDir: string,
    private readonly logger: Logger,
  ) {
    this.limiter = new IoLimiter((volumeId) => {
      try {
        return ioLimitsOf(store.getVolume(volumeId).attributes);
      } catch {
        return undefined; // deleted, or the store is closing: nothing to enforce
      }
    });
  }

  /** Removes FUSE mounts a dead instance left at the mount point (lazily: loop devices may hold them). */
  async cleanStale(): Promise<number> {
    const removed = await cleanStaleFuseMounts(this.mountDir);
    if (removed > 0)
      this.logger.warn({ mountDir: this.mountDir, removed }, 'removed stale FUSE mount of an earlier instance');
    return removed;
  }

  /** The generation of the live mount, or undefined when nothing is mounted (or the connection died). */
  get generation(): string | undefined {
    return this.server?.connected ? this.currentGeneration : undefined;
  }

  /** Where the file of `volumeId` is (or would be). */
  filePath(volumeId: string): string {
    return path.join(this.mountDir, volumeId);
  }

  /** Exposes a volume as a file, mounting first if needed. Exposing an exposed volume again is a no-op. */
  async expose(volumeId: string): Promise<ExposedFile> {
    await this.ensureMounted();
    const files = this.files!;
    files.add(volumeId, volumeId);
    return { path: this.filePath(volumeId), generation: this.currentGeneration! };
  }

  /**
   * Takes a volume's file away. A loop device still holding it keeps it open until detached. The store
   * hold on the volume ends when the kernel has let go of the file (RELEASE from the loop device's last
   * close, FORGET once the name is dropped), which comes shortly after a detach: this waits for that,
   * up to `settleMs`, so that a DeleteVolume right after unstaging is not refused as busy.
   */
  async hide(volumeId: string, settleMs = 5000): Promise<void> {
    const files = this.files;
    if (!files) return;
    await files.remove(volumeId);
    this.limiter.forget(volumeId);
    const deadline = Date.now() + settleMs;
    while (files.isExposed(volumeId) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
    if (files.isExposed(volumeId))
      this.logger.warn({ volumeId }, 'the kernel still holds the volume file; the volume stays busy until it lets go');
  }

  /** Whether the live mount has a file for the volume. */
  isExposed(volumeId: string): boolean {
    return this.generation !== undefined && (this.files?.names().includes(volumeId) ?? false);
  }

  /** Sets the file's size to the volume's new capacity and drops the kernel's cached size. */
  async grow(volumeId: string, capacityBytes: number): Promise<void> {
    if (!this.isExposed(volumeId)) throw new Error(`volume ${volumeId} is not exposed`);
    await this.files!.grow(volumeId, capacityBytes);
  }

  /** The volume's attributes changed: its I/O limits apply from the next request on, published or not. */
  limitsChanged(volumeId: string): void {
    this.limiter.refresh(volumeId);
    this.files?.reconsiderDirectIo(volumeId);
    this.logger.info({ volumeId, ...this.limiter.limitsOf(volumeId) }, 'I/O limits read from the volume');
  }

  private ensureMounted(): Promise<void> {
    if (this.stopped) return Promise.reject(new Error('the volume exporter is stopped'));
    if (this.server?.connected) return Promise.resolve();
    this.starting ??= this.mount().finally(() => (this.starting = undefined));
    return this.starting;
  }

  private async mount(): Promise<void> {
    if (this.server) {
      // The connection died under us (aborted from outside): files of it are dead; start a new one.
      this.logger.warn({ mountDir: this.mountDir }, 'FUSE connection lost; mounting a new one');
      await this.server
        .close()
        .catch((err: unknown) => this.logger.warn({ err }, 'closing the lost FUSE connection failed'));
      this.server = undefined;
    }
    fs.mkdirSync(this.mountDir, { recursive: true, mode: 0o700 });
    const files = new VolumeFiles(this.store, {
      holder: 'node-fuse',
      // A volume with I/O limits is served on the main thread, where the dispatcher admits each request.
      serveDirectly: (volumeId) => {
        const limits = this.limiter.limitsOf(volumeId);
        return limits.iops === 0 && limits.bytesPerSecond === 0;
      },
    });
    const server = await FuseServer.mount(this.mountDir, files, {
      logger: this.logger,
      source: 'cbt-csi',
      admit: fuseIoAdmission(this.limiter, (nodeid) => files.volumeOfNode(nodeid)),
    });
    this.files = files;
    this.server = server;
    this.currentGeneration = randomUUID();
    this.logger.info(
      { mountDir: this.mountDir, generation: this.currentGeneration, init: server.dispatcher.init },
      'volume files mounted',
    );
  }

  /** Unmounts (loop devices still attached get I/O errors from then on). Idempotent. */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.starting?.catch(() => undefined);
    const server = this.server;
    this.server = undefined;
    this.files = undefined;
    await server?.close();
  }
}
