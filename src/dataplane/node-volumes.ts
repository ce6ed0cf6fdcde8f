/**
 * The node plugin's volume work: stage (volume file, loop device, filesystem, staging mount), publish
 * (bind mounts), the reverse of both, usage and online growth, and recovery after a restart. The Node
 * service only validates requests and calls this.
 *
 * Restart rule: a loop device attached by an earlier instance is bound to that instance's FUSE
 * connection, which died with it, so every I/O on it fails (EIO) and nothing can reach the store through
 * it. It is never reattached behind a user's back: a pod keeps its dead device until the CO unpublishes
 * and unstages, and a new NodeStageVolume attaches a fresh device. Old devices are detached only at
 * unstage (or a re-stage without publications), so a device number a target still names is never
 * handed to another volume while that target exists.
 */
import fs from 'node:fs';
import path from 'node:path';
import { NotFoundError, type BlockStore } from '../../storage-engine/index.js';
import type { Logger } from '../logging.js';
import {
  bindMount,
  filesystemUsage,
  growExt4Offline,
  growFilesystem,
  isFilesystemType,
  isResizeRefused,
  isMountPoint,
  makeFilesystem,
  mountFilesystem,
  probeDevice,
  unmountAll,
  type FilesystemType,
  type FilesystemUsage,
} from './filesystems.js';
import {
  attachLoopDevice,
  detachLoopDevice,
  listLoopDevices,
  loopDevice,
  refreshLoopCapacity,
  type LoopDevice,
} from './loop-devices.js';
import { StageRecords, type DeviceRecord, type PublishRecord, type StageRecord, type StagedAccess } from './stage-records.js';
import { VolumeExporter } from './volume-exporter.js';

/** Why a node request cannot be done, in terms the Node service turns into CSI status codes. */
export type NodeErrorKind = 'invalid-argument' | 'not-found' | 'already-exists' | 'failed-precondition' | 'out-of-range';

export class NodeError extends Error {
  constructor(
    readonly kind: NodeErrorKind,
    message: string,
  ) {
    super(message);
    this.name = 'NodeError';
  }
}

export interface StageRequest {
  volumeId: string;
  stagingPath: string;
  access: StagedAccess;
  accessMode: number;
  readOnly: boolean;
  /** Identity of the request's capability: a second stage must carry the same one. */
  capabilityKey: string;
}

export interface PublishRequest {
  volumeId: string;
  stagingPath: string;
  targetPath: string;
  accessKind: StagedAccess['kind'];
  accessMode: number;
  readonly: boolean;
  capabilityKey: string;
  /** Only one target at a time (SINGLE_NODE_SINGLE_WRITER). */
  exclusive: boolean;
}

export interface VolumeCondition {
  abnormal: boolean;
  message: string;
}

export interface VolumeStats {
  kind: StagedAccess['kind'];
  capacityBytes: number;
  /** Filesystem usage (mount access, healthy volumes only). */
  usage: FilesystemUsage | undefined;
  condition: VolumeCondition;
}

/** Holder name under which staged volumes are held in the store (deletion is refused while staged). */
const STAGED_HOLDER = 'node-staged';

export interface NodeVolumesOptions {
  store: BlockStore;
  /** The driver's state directory: the FUSE mount is <stateDir>/fuse, records are in <stateDir>/node. */
  stateDir: string;
  logger: Logger;
}

export class NodeVolumes {
  private readonly store: BlockStore;
  private readonly logger: Logger;
  private readonly records: StageRecords;
  readonly exporter: VolumeExporter;
  private readonly locks = new Map<string, Promise<unknown>>();

  constructor(options: NodeVolumesOptions) {
    this.store = options.store;
    this.logger = options.logger;
    this.records = new StageRecords(path.join(options.stateDir, 'node'));
    this.exporter = new VolumeExporter(options.store, path.join(options.stateDir, 'fuse'), options.logger);
  }

  /**
   * Recovers after a restart: removes the dead FUSE mount of the earlier instance, holds every staged
   * volume again, and checks that recorded loop devices are still the ones attached to our files (after a
   * reboot they are gone, and their numbers may belong to someone else).
   */
  async start(): Promise<void> {
    await this.exporter.cleanStale();
    const records = this.records.list((file, err) => this.logger.warn({ file, err: String(err) }, 'unreadable stage record skipped'));
    if (records.length === 0) return;
    const attached = await listLoopDevices();
    const mountDir = this.exporter.mountDir;
    for (const rec of records) {
      try {
        this.store.hold(rec.volumeId, STAGED_HOLDER);
      } catch (err) {
        if (!(err instanceof NotFoundError)) throw err;
        this.logger.warn({ volumeId: rec.volumeId }, 'a staged volume is no longer in the store');
      }
      const ours = (name: string | undefined) => name !== undefined && isOurDevice(name, rec.volumeId, mountDir, attached);
      if (rec.device && !ours(rec.device.name)) rec.device = undefined;
      rec.retiredDevices = rec.retiredDevices.filter((d) => ours(d.name));
      for (const pub of Object.values(rec.publishes)) if (!ours(pub.device)) delete pub.device;
      this.records.put(rec);
    }
    this.logger.warn(
      { volumes: records.map((r) => r.volumeId) },
      'staged volumes recovered from an earlier instance: their devices fail all I/O until they are unstaged and staged again',
    );
  }

  /** Unmounts the volume files: devices still attached fail from then on. */
  async stop(): Promise<void> {
    await this.exporter.stop();
  }

  // ------------------------------------------------------------------ stage

  stage(req: StageRequest): Promise<void> {
    return this.locked(req.volumeId, async () => {
      this.store.getVolume(req.volumeId);
      let rec = this.records.get(req.volumeId);
      if (rec) {
        if (rec.stagingPath !== req.stagingPath) {
          throw new NodeError('failed-precondition', `volume ${req.volumeId} is staged at ${rec.stagingPath}, not at this staging_target_path`);
        }
        if (rec.capabilityKey !== req.capabilityKey) {
          throw new NodeError('already-exists', `volume ${req.volumeId} is staged at this path with a different volume_capability`);
        }
        if (await this.isStaged(rec)) return;
      } else {
        rec = {
          volumeId: req.volumeId,
          stagingPath: req.stagingPath,
          access: req.access,
          accessMode: req.accessMode,
          capabilityKey: req.capabilityKey,
          readOnly: req.readOnly,
          device: undefined,
          retiredDevices: [],
          publishes: {},
        };
        // Recorded before anything is attached: whatever a crash leaves half done, unstage can find.
        this.records.put(rec);
        this.store.hold(req.volumeId, STAGED_HOLDER);
      }
      await this.bringUp(rec);
    });
  }

  /** Whether every part of the staging is in place on the live mount. */
  private async isStaged(rec: StageRecord): Promise<boolean> {
    if (!rec.device || rec.device.generation !== this.exporter.generation) return false;
    return rec.access.kind === 'block' || (await isMountPoint(rec.stagingPath));
  }

  /** Attaches a device of the live mount (retiring a dead one) and mounts the filesystem. */
  private async bringUp(rec: StageRecord): Promise<void> {
    const exposed = await this.exporter.expose(rec.volumeId);
    if (!rec.device || rec.device.generation !== exposed.generation) {
      if (rec.access.kind === 'mount') await unmountAll(rec.stagingPath, { lazy: true });
      if (rec.device) {
        // A target may still name the dead device: keep its number taken until unstage.
        if (Object.keys(rec.publishes).length > 0) rec.retiredDevices.push(rec.device);
        else await detachLoopDevice(rec.device.name);
        rec.device = undefined;
        this.records.put(rec);
      }
      const name = await attachLoopDevice(exposed.path, { readOnly: rec.readOnly });
      rec.device = await deviceRecord(name, exposed.generation);
      this.records.put(rec);
      this.logger.info({ volumeId: rec.volumeId, device: name }, 'loop device attached');
    }
    if (rec.access.kind === 'mount' && !(await isMountPoint(rec.stagingPath))) {
      const fsType = await this.prepareFilesystem(rec, rec.device.name);
      await fs.promises.mkdir(rec.stagingPath, { recursive: true });
      await mountFilesystem(rec.device.name, rec.stagingPath, fsType, rec.access.mountFlags, rec.readOnly);
      rec.access = { ...rec.access, fsType };
      this.records.put(rec);
    }
  }

  /** The filesystem to mount: the one on the device, or a new one on a blank device. */
  private async prepareFilesystem(rec: StageRecord, device: string): Promise<FilesystemType> {
    if (rec.access.kind !== 'mount') throw new Error('not a mount volume');
    const wanted = rec.access.fsType;
    const found = await probeDevice(device);
    if (found.type === undefined && found.partitionTable === undefined) {
      if (rec.readOnly) {
        throw new NodeError('failed-precondition', `volume ${rec.volumeId} has no filesystem and cannot be formatted read-only`);
      }
      const type: FilesystemType = wanted === '' ? 'ext4' : (wanted as FilesystemType);
      await makeFilesystem(device, type);
      this.logger.info({ volumeId: rec.volumeId, fsType: type }, 'filesystem made');
      return type;
    }
    if (found.type === undefined || !isFilesystemType(found.type)) {
      throw new NodeError(
        'failed-precondition',
        `volume ${rec.volumeId} holds ${found.type ?? `a ${found.partitionTable ?? 'unknown'} partition table`}, which this driver does not mount`,
      );
    }
    if (wanted !== '' && wanted !== found.type) {
      throw new NodeError('failed-precondition', `volume ${rec.volumeId} holds ${found.type}, not the requested ${wanted}`);
    }
    return found.type;
  }

  unstage(volumeId: string, stagingPath: string): Promise<void> {
    return this.locked(volumeId, async () => {
      const rec = this.records.get(volumeId);
      if (!rec) {
        this.store.getVolume(volumeId); // unknown volume: NOT_FOUND; known but not staged: done
        return;
      }
      if (rec.stagingPath !== stagingPath) return;
      const targets = Object.keys(rec.publishes);
      if (targets.length > 0) {
        throw new NodeError('failed-precondition', `volume ${volumeId} is still published at ${targets.join(', ')}`);
      }
      const live = rec.device !== undefined && rec.device.generation === this.exporter.generation;
      if (rec.access.kind === 'mount') {
        // A filesystem on a dead device cannot flush; detaching it is all that can be done.
        await unmountAll(stagingPath, { lazy: !live });
      }
      for (const d of [...rec.retiredDevices, ...(rec.device ? [rec.device] : [])]) await detachLoopDevice(d.name);
      await this.exporter.hide(volumeId);
      this.store.release(volumeId, STAGED_HOLDER);
      this.records.delete(volumeId);
      this.logger.info({ volumeId }, 'volume unstaged');
    });
  }

  // ------------------------------------------------------------------ publish

  publish(req: PublishRequest): Promise<void> {
    return this.locked(req.volumeId, async () => {
      this.store.getVolume(req.volumeId);
      const rec = this.records.get(req.volumeId);
      if (!rec || rec.stagingPath !== req.stagingPath) {
        throw new NodeError('failed-precondition', `volume ${req.volumeId} is not staged at staging_target_path`);
      }
      if (rec.access.kind !== req.accessKind) {
        throw new NodeError('failed-precondition', `volume ${req.volumeId} is staged for ${rec.access.kind} access, not ${req.accessKind}`);
      }
      const existing = rec.publishes[req.targetPath];
      if (existing) {
        if (existing.capabilityKey !== req.capabilityKey || existing.readonly !== req.readonly) {
          throw new NodeError('already-exists', `volume ${req.volumeId} is published at target_path with a different capability or readonly flag`);
        }
        if (existing.generation === this.exporter.generation && (await isMountPoint(req.targetPath))) return;
      } else {
        const others = Object.entries(rec.publishes);
        if (others.length > 0 && (req.exclusive || others.some(([, p]) => p.exclusive))) {
          throw new NodeError('failed-precondition', `volume ${req.volumeId} is already published at another target (single writer)`);
        }
      }
      if (!rec.device || rec.device.generation !== this.exporter.generation) {
        throw new NodeError(
          'failed-precondition',
          `volume ${req.volumeId} was staged by an earlier instance of the driver and its device is dead: unstage and stage it again`,
        );
      }
      // A publication being repaired (dead device) is taken down first.
      if (existing) await this.takeDown(req.targetPath, existing);
      const pub: PublishRecord = {
        readonly: req.readonly,
        capabilityKey: req.capabilityKey,
        accessMode: req.accessMode,
        exclusive: req.exclusive,
        generation: rec.device.generation,
      };
      rec.publishes[req.targetPath] = pub;
      this.records.put(rec);
      try {
        if (rec.access.kind === 'block') {
          let device = rec.device.name;
          if (req.readonly && !rec.readOnly) {
            // A read-only bind mount does not stop writes to a device node; a read-only loop device does.
            device = await attachLoopDevice(this.exporter.filePath(req.volumeId), { readOnly: true });
            pub.device = device;
            this.records.put(rec);
          }
          await makeDeviceTarget(req.targetPath);
          await bindMount(device, req.targetPath, req.readonly);
        } else {
          await fs.promises.mkdir(req.targetPath, { recursive: true });
          await bindMount(rec.stagingPath, req.targetPath, req.readonly);
        }
      } catch (err) {
        await this.takeDown(req.targetPath, pub).catch(() => undefined);
        delete rec.publishes[req.targetPath];
        this.records.put(rec);
        throw err;
      }
      this.logger.info({ volumeId: req.volumeId, readonly: req.readonly }, 'volume published');
    });
  }

  unpublish(volumeId: string, targetPath: string): Promise<void> {
    return this.locked(volumeId, async () => {
      const rec = this.records.get(volumeId);
      const pub = rec?.publishes[targetPath];
      if (!rec) this.store.getVolume(volumeId); // unknown volume: NOT_FOUND
      if (!pub) {
        // Not ours (any more), or a crash came between creating the target and recording it.
        if (await isMountPoint(targetPath)) return;
        await removeTarget(targetPath, true);
        return;
      }
      await this.takeDown(targetPath, pub);
      delete rec!.publishes[targetPath];
      this.records.put(rec!);
      this.logger.info({ volumeId }, 'volume unpublished');
    });
  }

  /** Unmounts a target, removes what we created there, detaches its own device. */
  private async takeDown(targetPath: string, pub: PublishRecord): Promise<void> {
    const live = pub.generation === this.exporter.generation;
    await unmountAll(targetPath, { lazy: !live });
    await removeTarget(targetPath, false);
    if (pub.device) {
      await detachLoopDevice(pub.device);
      delete pub.device;
    }
  }

  // ------------------------------------------------------------------ stats, expand

  stats(volumeId: string, volumePath: string): Promise<VolumeStats> {
    return this.locked(volumeId, async () => {
      const volume = this.store.getVolume(volumeId);
      const rec = this.records.get(volumeId);
      const where = rec && whereIs(rec, volumePath);
      if (!rec || !where) throw new NodeError('not-found', `volume ${volumeId} is not staged or published at volume_path`);
      const condition = await this.condition(rec, volumePath);
      let usage: FilesystemUsage | undefined;
      if (rec.access.kind === 'mount' && !condition.abnormal) usage = await filesystemUsage(volumePath);
      return { kind: rec.access.kind, capacityBytes: volume.capacityBytes, usage, condition };
    });
  }

  private async condition(rec: StageRecord, volumePath: string): Promise<VolumeCondition> {
    const live = this.exporter.generation;
    const pub = rec.publishes[volumePath];
    if (!rec.device || rec.device.generation !== live || (pub && pub.generation !== live)) {
      return {
        abnormal: true,
        message: 'the node plugin restarted since this volume was staged: its device fails all I/O until the volume is unstaged and staged again',
      };
    }
    const mounted = rec.access.kind === 'mount' || pub !== undefined;
    if (mounted && !(await isMountPoint(volumePath))) return { abnormal: true, message: `nothing is mounted at ${volumePath}` };
    if (!(await loopDevice(rec.device.name))) return { abnormal: true, message: `loop device ${rec.device.name} is gone` };
    return { abnormal: false, message: `served by ${rec.device.name} through the block store` };
  }

  /**
   * Brings the node's view up to the volume's capacity (ControllerExpandVolume grew it): the file's size,
   * the loop devices' capacity, then the filesystem. Returns the capacity.
   */
  expand(volumeId: string, volumePath: string, requiredBytes: number): Promise<number> {
    return this.locked(volumeId, async () => {
      const volume = this.store.getVolume(volumeId);
      const rec = this.records.get(volumeId);
      if (!rec || !whereIs(rec, volumePath)) throw new NodeError('not-found', `volume ${volumeId} is not staged or published at volume_path`);
      if (requiredBytes > volume.capacityBytes) {
        throw new NodeError(
          'out-of-range',
          `volume ${volumeId} has ${volume.capacityBytes} bytes, less than the ${requiredBytes} required: ControllerExpandVolume grows it first`,
        );
      }
      if (!rec.device || rec.device.generation !== this.exporter.generation) {
        throw new NodeError('failed-precondition', `volume ${volumeId} was staged by an earlier instance of the driver: unstage and stage it again`);
      }
      await this.exporter.grow(volumeId, volume.capacityBytes);
      await refreshLoopCapacity(rec.device.name);
      for (const pub of Object.values(rec.publishes)) if (pub.device) await refreshLoopCapacity(pub.device);
      if (rec.access.kind === 'mount' && !rec.readOnly) {
        const fsType = rec.access.fsType;
        if (!isFilesystemType(fsType)) throw new Error(`staged filesystem type ${fsType} is unknown`);
        try {
          await growFilesystem(rec.device.name, rec.stagingPath, fsType);
        } catch (err) {
          // Online ext4 growth needs CAP_SYS_RESOURCE, which some containers drop. Unpublished, the staging
          // mount is the filesystem's only user and can be grown offline; published, a pod is using it.
          if (!isResizeRefused(err)) throw err;
          if (Object.keys(rec.publishes).length > 0) {
            throw new NodeError(
              'failed-precondition',
              `ext4 on volume ${volumeId} cannot be grown while published: the kernel refused online resizing (no CAP_SYS_RESOURCE?)`,
            );
          }
          this.logger.warn({ volumeId }, 'online ext4 resize refused; growing it unmounted');
          await unmountAll(rec.stagingPath);
          await growExt4Offline(rec.device.name);
          await mountFilesystem(rec.device.name, rec.stagingPath, fsType, rec.access.mountFlags, rec.readOnly);
        }
      }
      this.logger.info({ volumeId, capacityBytes: volume.capacityBytes }, 'volume expanded on the node');
      return volume.capacityBytes;
    });
  }

  /** Runs `fn` after every earlier call for the same volume has finished. */
  private locked<T>(volumeId: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.locks.get(volumeId) ?? Promise.resolve();
    const run = previous.then(fn, fn);
    const tail = run.catch(() => undefined);
    this.locks.set(volumeId, tail);
    void tail.then(() => {
      if (this.locks.get(volumeId) === tail) this.locks.delete(volumeId);
    });
    return run;
  }
}

/** Whether `volumePath` is where the record has the volume: its staging path or one of its targets. */
function whereIs(rec: StageRecord, volumePath: string): 'staging' | 'target' | undefined {
  if (rec.stagingPath === volumePath) return 'staging';
  return rec.publishes[volumePath] ? 'target' : undefined;
}

async function deviceRecord(name: string, generation: string): Promise<DeviceRecord> {
  if (!(await loopDevice(name))) throw new Error(`loop device ${name} vanished right after it was attached`);
  return { name, generation };
}

/**
 * Whether loop device `name` is still attached to the volume's file. The kernel names the file by its
 * path in our mount, or, once that dead mount was detached, by its path from the detached mount's root
 * ("/<volumeId>"); the backing inode cannot be read any more then. After a reboot the device is gone or
 * belongs to someone else, and does not match.
 */
function isOurDevice(name: string, volumeId: string, mountDir: string, attached: readonly LoopDevice[]): boolean {
  const paths = [path.join(mountDir, volumeId), `/${volumeId}`];
  return attached.some((a) => a.name === name && paths.some((p) => a.backFile === p || a.backFile === `${p} (deleted)`));
}

/** The file a block device is bind-mounted onto. An empty directory there (some COs make one) is replaced. */
async function makeDeviceTarget(target: string): Promise<void> {
  const st = await fs.promises.lstat(target).catch(() => undefined);
  if (st?.isDirectory()) await fs.promises.rmdir(target);
  else if (st && !st.isFile()) throw new NodeError('failed-precondition', 'target_path exists and is neither a file nor a directory');
  const handle = await fs.promises.open(target, 'a', 0o600);
  await handle.close();
}

/**
 * Removes a target we created: an empty directory or a file. With `onlyEmpty`, a regular file is only
 * removed if it is empty (a bind-mount target is), so nothing with content is deleted on a guess.
 */
async function removeTarget(target: string, onlyEmpty: boolean): Promise<void> {
  const st = await fs.promises.lstat(target).catch(() => undefined);
  if (!st) return;
  if (st.isDirectory()) {
    await fs.promises.rmdir(target).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
  } else if (!onlyEmpty || (st.isFile() && st.size === 0)) {
    await fs.promises.rm(target, { force: true });
  }
}
