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
import { KeyedMutex, NotFoundError, type BlockStore } from '../../storage-engine/index.js';
import type { Logger } from '../logging.js';
import { isFilesystemType, type FilesystemType, type FilesystemUsage } from './filesystems.js';
import { realHostOps, type HostOps, type VolumeFilesHost } from './host-ops.js';
import type { LoopDevice } from './loop-devices.js';
import { NodeError } from './node-errors.js';
import { NodePaths, type Created } from './node-paths.js';
import {
  StageRecords,
  type DeviceRecord,
  type PublishRecord,
  type StageRecord,
  type StagedAccess,
} from './stage-records.js';
import { VolumeExporter } from './volume-exporter.js';

export { NodeError, type NodeErrorKind } from './node-errors.js';

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
  /** Mounts, loop devices, filesystems: the real host unless a test gives another. */
  host?: HostOps;
  /** The volume files loop devices are attached to: a FUSE mount at <stateDir>/fuse unless a test gives another. */
  files?: VolumeFilesHost;
}

export class NodeVolumes {
  private readonly store: BlockStore;
  private readonly logger: Logger;
  private readonly host: HostOps;
  private readonly records: StageRecords;
  private readonly paths: NodePaths;
  readonly exporter: VolumeFilesHost;
  /** One volume's node operations at a time. */
  private readonly mutex = new KeyedMutex();
  /**
   * One operation at a time on a place (a staging path or target, resolved), whatever the volume: two
   * volumes sent to one path at once must not both find it free and stack their mounts. Taken inside a
   * volume's lock, never the other way round.
   */
  private readonly places = new KeyedMutex();

  constructor(options: NodeVolumesOptions) {
    this.store = options.store;
    this.logger = options.logger;
    this.host = options.host ?? realHostOps;
    this.records = new StageRecords(path.join(options.stateDir, 'node'));
    this.paths = new NodePaths(options.stateDir);
    this.exporter =
      options.files ?? new VolumeExporter(options.store, path.join(options.stateDir, 'fuse'), options.logger);
  }

  /**
   * Recovers after a restart: detaches loop devices the earlier instance attached and never recorded,
   * removes its dead FUSE mount and holds every staged volume again. Writes nothing to the state directory
   * (a full state disk must not stop a restart): recorded loop devices are checked against the kernel's
   * list whenever one is about to be detached.
   */
  async start(): Promise<void> {
    let unreadable = false;
    const records = this.records.list((file, err) => {
      unreadable = true;
      this.logger.warn({ file, err: String(err) }, 'unreadable stage record skipped');
    });
    // Only while every record could be read is it known which devices are recorded.
    if (!unreadable) await this.detachUnrecorded(records);
    await this.exporter.cleanStale();
    if (records.length === 0) return;
    for (const rec of records) {
      try {
        this.store.hold(rec.volumeId, STAGED_HOLDER);
      } catch (err) {
        if (!(err instanceof NotFoundError)) throw err;
        this.logger.warn({ volumeId: rec.volumeId }, 'a staged volume is no longer in the store');
      }
    }
    this.logger.warn(
      { volumes: records.map((r) => r.volumeId) },
      'staged volumes recovered from an earlier instance: their devices fail all I/O until they are unstaged and staged again',
    );
  }

  /**
   * Detaches loop devices over files of our volume-file mount that no record names: an earlier instance
   * attached them and died before writing the record (staging and read-only publishes attach first, then
   * record the device's name). The mount is in our state directory, so whatever is attached to a file
   * there is ours. Runs before the dead mount is taken away, while the kernel still names those files by
   * their path there.
   */
  private async detachUnrecorded(records: readonly StageRecord[]): Promise<void> {
    const recorded = new Set<string>();
    for (const rec of records) {
      if (rec.device) recorded.add(rec.device.name);
      for (const d of rec.retiredDevices) recorded.add(d.name);
      for (const pub of Object.values(rec.publishes)) if (pub.device) recorded.add(pub.device);
    }
    // The mount point of a dead connection cannot be stat'ed (ENOTCONN): its parent is resolved instead.
    const { mountDir: dir } = this.exporter;
    const parent = await fs.promises.realpath(path.dirname(dir)).catch(() => path.dirname(dir));
    const mountDir = path.join(parent, path.basename(dir));
    const strays = (await this.host.listLoopDevices()).filter(
      (d) => d.backFile.startsWith(`${mountDir}/`) && !recorded.has(d.name),
    );
    for (const d of strays) {
      await this.host.detachLoopDevice(d.name);
      this.logger.warn(
        { device: d.name, file: d.backFile },
        'detached a loop device an earlier instance attached but never recorded',
      );
    }
  }

  /** The store says a volume's attributes changed: its I/O limits are read again (published or not). */
  volumeAttributesChanged(volumeId: string): void {
    this.exporter.limitsChanged?.(volumeId);
  }

  /** Unmounts the volume files: devices still attached fail from then on. */
  async stop(): Promise<void> {
    await this.exporter.stop();
  }

  // ------------------------------------------------------------------ stage

  stage(req: StageRequest): Promise<void> {
    return this.mutex.run(req.volumeId, async () => {
      this.store.getVolume(req.volumeId);
      const real = await this.paths.resolve(req.stagingPath, 'staging_target_path');
      await this.places.run(real, async () => {
        let rec = this.records.get(req.volumeId);
        if (rec) {
          if (rec.stagingPath !== req.stagingPath) {
            throw new NodeError(
              'failed-precondition',
              `volume ${req.volumeId} is staged at ${rec.stagingPath}, not at this staging_target_path`,
            );
          }
          if (rec.capabilityKey !== req.capabilityKey) {
            throw new NodeError(
              'already-exists',
              `volume ${req.volumeId} is staged at this path with a different volume_capability`,
            );
          }
          if (await this.isStaged(rec)) return;
        } else {
          // Checked before anything is recorded or attached: a refused path leaves nothing behind.
          const state = await this.checkStagingPath(real, req.stagingPath, req.access);
          rec = {
            volumeId: req.volumeId,
            stagingPath: req.stagingPath,
            stagingRealPath: real,
            stagingCreated: state === 'absent' ? 'directory' : 'nothing',
            access: req.access,
            accessMode: req.accessMode,
            capabilityKey: req.capabilityKey,
            readOnly: req.readOnly,
            device: undefined,
            retiredDevices: [],
            publishes: {},
          };
          // Held first: a volume deleted while its path was checked is NOT_FOUND here, before anything is
          // recorded. Recorded before anything is attached or created: whatever a crash leaves half done,
          // unstage can find.
          this.store.hold(req.volumeId, STAGED_HOLDER);
          try {
            this.records.put(rec);
          } catch (err) {
            this.store.release(req.volumeId, STAGED_HOLDER);
            throw err;
          }
        }
        await this.bringUp(rec);
      });
    });
  }

  /**
   * A block volume puts nothing at the staging path (it must be a directory if it exists); a filesystem
   * is mounted there, so it must be absent (the driver creates it) or an empty directory.
   */
  private async checkStagingPath(real: string, requested: string, access: StagedAccess): Promise<'absent' | 'usable'> {
    if (access.kind === 'mount') {
      const state = await this.paths.inspect(real, requested, 'staging_target_path', 'directory');
      await this.refuseMountPoint(real, requested, 'staging_target_path');
      return state;
    }
    try {
      const st = await fs.promises.lstat(real);
      if (!st.isDirectory()) {
        throw new NodeError('failed-precondition', `staging_target_path ${requested} exists and is not a directory`);
      }
      return 'usable';
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'usable';
      throw err;
    }
  }

  /** Whether every part of the staging is in place on the live mount. */
  private async isStaged(rec: StageRecord): Promise<boolean> {
    if (!rec.device || rec.device.generation !== this.exporter.generation) return false;
    return rec.access.kind === 'block' || (await this.host.isMountPoint(stagingReal(rec)));
  }

  /** Attaches a device of the live mount (retiring a dead one) and mounts the filesystem. */
  private async bringUp(rec: StageRecord): Promise<void> {
    const exposed = await this.exporter.expose(rec.volumeId);
    if (!rec.device || rec.device.generation !== exposed.generation) {
      if (rec.device) {
        // The dead device's filesystem is ours to take down; with no device recorded, nothing was mounted.
        if (rec.access.kind === 'mount') await this.host.unmountAll(stagingReal(rec), { lazy: true });
        // A target may still name the dead device: keep its number taken until unstage.
        if (Object.keys(rec.publishes).length > 0) rec.retiredDevices.push(rec.device);
        else await this.detachOurs(rec.volumeId, [rec.device.name]);
        rec.device = undefined;
        this.records.put(rec);
      }
      const name = await this.host.attachLoopDevice(exposed.path, { readOnly: rec.readOnly });
      rec.device = await this.deviceRecord(name, exposed.generation);
      this.records.put(rec);
      this.logger.info({ volumeId: rec.volumeId, device: name }, 'loop device attached');
    }
    const real = stagingReal(rec);
    if (rec.access.kind === 'mount' && !(await this.host.isMountPoint(real))) {
      const state = await this.paths.inspect(real, rec.stagingPath, 'staging_target_path', 'directory');
      const fsType = await this.prepareFilesystem(rec, rec.device.name);
      if (state === 'absent') {
        if (rec.stagingCreated !== 'directory') {
          rec.stagingCreated = 'directory';
          this.records.put(rec);
        }
        await this.paths.create(real, rec.stagingPath, 'staging_target_path', 'directory');
      }
      await this.host.mountFilesystem(rec.device.name, real, fsType, rec.access.mountFlags, rec.readOnly);
      rec.access = { ...rec.access, fsType };
      this.records.put(rec);
    }
  }

  /** The filesystem to mount: the one on the device, or a new one on a blank device. */
  private async prepareFilesystem(rec: StageRecord, device: string): Promise<FilesystemType> {
    if (rec.access.kind !== 'mount') throw new Error('not a mount volume');
    const wanted = rec.access.fsType;
    const found = await this.host.probeDevice(device);
    if (found.type === undefined && found.partitionTable === undefined) {
      if (rec.readOnly) {
        throw new NodeError(
          'failed-precondition',
          `volume ${rec.volumeId} has no filesystem and cannot be formatted read-only`,
        );
      }
      const type: FilesystemType = wanted === '' ? 'ext4' : (wanted as FilesystemType);
      await this.host.makeFilesystem(device, type);
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
      throw new NodeError(
        'failed-precondition',
        `volume ${rec.volumeId} holds ${found.type}, not the requested ${wanted}`,
      );
    }
    return found.type;
  }

  /** Takes the staging down. Writes nothing but unlinks: works on a full state disk. */
  unstage(volumeId: string, stagingPath: string): Promise<void> {
    return this.mutex.run(volumeId, async () => {
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
      const real = stagingReal(rec);
      await this.places.run(real, async () => {
        const live = rec.device !== undefined && rec.device.generation === this.exporter.generation;
        if (rec.stagingRealPath) await this.paths.checkStillResolves(real, stagingPath, 'staging_target_path');
        if (rec.access.kind === 'mount') {
          // A filesystem on a dead device cannot flush; detaching it is all that can be done.
          await this.host.unmountAll(real, { lazy: !live });
        }
        await this.detachOurs(
          volumeId,
          [...rec.retiredDevices, ...(rec.device ? [rec.device] : [])].map((d) => d.name),
        );
        await this.exporter.hide(volumeId);
        this.store.release(volumeId, STAGED_HOLDER);
        await this.removeCreated(
          volumeId,
          rec.stagingPath,
          real,
          rec.stagingCreated ?? 'nothing',
          'staging_target_path',
        );
        this.records.delete(volumeId);
        this.logger.info({ volumeId }, 'volume unstaged');
      });
    });
  }

  // ------------------------------------------------------------------ publish

  publish(req: PublishRequest): Promise<void> {
    return this.mutex.run(req.volumeId, async () => {
      this.store.getVolume(req.volumeId);
      const real = await this.paths.resolve(req.targetPath, 'target_path');
      await this.places.run(real, async () => {
        const rec = this.records.get(req.volumeId);
        if (!rec || rec.stagingPath !== req.stagingPath) {
          throw new NodeError('failed-precondition', `volume ${req.volumeId} is not staged at staging_target_path`);
        }
        if (rec.access.kind !== req.accessKind) {
          throw new NodeError(
            'failed-precondition',
            `volume ${req.volumeId} is staged for ${rec.access.kind} access, not ${req.accessKind}`,
          );
        }
        const existing = rec.publishes[req.targetPath];
        if (existing) {
          if (existing.capabilityKey !== req.capabilityKey || existing.readonly !== req.readonly) {
            throw new NodeError(
              'already-exists',
              `volume ${req.volumeId} is published at target_path with a different capability or readonly flag`,
            );
          }
          if (
            existing.generation === this.exporter.generation &&
            (await this.host.isMountPoint(publishedReal(req.targetPath, existing)))
          )
            return;
        } else {
          const others = Object.entries(rec.publishes);
          if (others.length > 0 && (req.exclusive || others.some(([, p]) => p.exclusive))) {
            throw new NodeError(
              'failed-precondition',
              `volume ${req.volumeId} is already published at another target (single writer)`,
            );
          }
        }
        if (!rec.device || rec.device.generation !== this.exporter.generation) {
          throw new NodeError(
            'failed-precondition',
            `volume ${req.volumeId} was staged by an earlier instance of the driver and its device is dead: unstage and stage it again`,
          );
        }
        // A publication being repaired (dead device, or its mount gone) is taken down first.
        if (existing) {
          await this.takeDown(req.volumeId, req.targetPath, existing);
          this.records.deletePublish(req.volumeId, req.targetPath);
        }
        const use = rec.access.kind === 'block' ? 'file' : 'directory';
        const state = await this.paths.inspect(real, req.targetPath, 'target_path', use);
        await this.refuseMountPoint(real, req.targetPath, 'target_path');
        const pub: PublishRecord = {
          readonly: req.readonly,
          capabilityKey: req.capabilityKey,
          accessMode: req.accessMode,
          exclusive: req.exclusive,
          generation: rec.device.generation,
          realPath: real,
          created: state === 'absent' ? use : 'nothing',
        };
        // Recorded before anything is created or attached, so a crash leaves nothing unpublish cannot find.
        this.records.putPublish(req.volumeId, req.targetPath, pub);
        try {
          if (state === 'absent') await this.paths.create(real, req.targetPath, 'target_path', use);
          if (rec.access.kind === 'block') {
            let device = rec.device.name;
            if (req.readonly && !rec.readOnly) {
              // A read-only bind mount does not stop writes to a device node; a read-only loop device does.
              device = await this.host.attachLoopDevice(this.exporter.filePath(req.volumeId), { readOnly: true });
              pub.device = device;
              this.records.putPublish(req.volumeId, req.targetPath, pub);
            }
            await this.host.bindMount(device, real, req.readonly);
          } else {
            await this.host.bindMount(stagingReal(rec), real, req.readonly);
          }
        } catch (err) {
          await this.takeDown(req.volumeId, req.targetPath, pub).catch((e: unknown) =>
            this.logger.warn(
              { volumeId: req.volumeId, targetPath: req.targetPath, err: String(e) },
              'undoing a failed publish failed',
            ),
          );
          this.records.deletePublish(req.volumeId, req.targetPath);
          throw err;
        }
        this.logger.info({ volumeId: req.volumeId, readonly: req.readonly }, 'volume published');
      });
    });
  }

  /**
   * Takes a publication down. A target with no publication recorded is not the driver's: OK, untouched.
   * Writes nothing but an unlink: works on a full state disk.
   */
  unpublish(volumeId: string, targetPath: string): Promise<void> {
    return this.mutex.run(volumeId, async () => {
      const rec = this.records.get(volumeId);
      if (!rec) {
        this.store.getVolume(volumeId); // unknown volume: NOT_FOUND
        return;
      }
      const pub = rec.publishes[targetPath];
      if (!pub) return;
      await this.places.run(publishedReal(targetPath, pub), async () => {
        await this.takeDown(volumeId, targetPath, pub);
        this.records.deletePublish(volumeId, targetPath);
        this.logger.info({ volumeId }, 'volume unpublished');
      });
    });
  }

  /** Unmounts a target, removes what the driver created there, detaches its own device. */
  private async takeDown(volumeId: string, targetPath: string, pub: PublishRecord): Promise<void> {
    const live = pub.generation === this.exporter.generation;
    const real = publishedReal(targetPath, pub);
    if (pub.realPath) await this.paths.checkStillResolves(real, targetPath, 'target_path');
    await this.host.unmountAll(real, { lazy: !live });
    // Records of earlier versions did not say what was created: they always created an empty file or directory.
    const created: Created = pub.created ?? ((await isDirectory(real)) ? 'directory' : 'file');
    await this.removeCreated(volumeId, targetPath, real, created, 'target_path');
    if (pub.device) await this.detachOurs(volumeId, [pub.device]);
  }

  /**
   * A path where something is already mounted is someone else's mount (ours are recorded and answered
   * before this): covering it would hide it, and taking ours down would unmount it too.
   */
  private async refuseMountPoint(real: string, requested: string, field: string): Promise<void> {
    if (await this.host.isMountPoint(real)) {
      throw new NodeError(
        'failed-precondition',
        `${field} ${requested} is a mount point of another filesystem: the driver does not cover or unmount it`,
      );
    }
  }

  /** Removes what the driver created at a path; what it must leave is logged, never an error. */
  private async removeCreated(
    volumeId: string,
    requested: string,
    real: string,
    created: Created,
    field: string,
  ): Promise<void> {
    const outcome = await this.paths.removeCreated(real, created);
    if (outcome.left) {
      this.logger.warn(
        { volumeId, [field]: requested, reason: outcome.left },
        `${field} left in place: ${outcome.left}; the driver removes only what it created, and only while it is empty`,
      );
    }
  }

  /**
   * Detaches loop devices the records name, each only if the kernel still has it on this volume's file
   * (after a reboot the number may belong to someone else).
   */
  private async detachOurs(volumeId: string, names: readonly string[]): Promise<void> {
    if (names.length === 0) return;
    const attached = await this.host.listLoopDevices();
    for (const name of names) {
      if (isOurDevice(name, volumeId, this.exporter.mountDir, attached)) await this.host.detachLoopDevice(name);
      else if (attached.some((a) => a.name === name)) {
        this.logger.warn({ volumeId, device: name }, 'a recorded loop device now serves another file; left attached');
      }
    }
  }

  // ------------------------------------------------------------------ stats, expand

  stats(volumeId: string, volumePath: string): Promise<VolumeStats> {
    return this.mutex.run(volumeId, async () => {
      const volume = this.store.getVolume(volumeId);
      const rec = this.records.get(volumeId);
      const where = rec && whereIs(rec, volumePath);
      if (!rec || !where)
        throw new NodeError('not-found', `volume ${volumeId} is not staged or published at volume_path`);
      const condition = await this.condition(rec, volumePath);
      let usage: FilesystemUsage | undefined;
      if (rec.access.kind === 'mount' && !condition.abnormal)
        usage = await this.host.filesystemUsage(realOf(rec, volumePath));
      return { kind: rec.access.kind, capacityBytes: volume.capacityBytes, usage, condition };
    });
  }

  private async condition(rec: StageRecord, volumePath: string): Promise<VolumeCondition> {
    const live = this.exporter.generation;
    const pub = rec.publishes[volumePath];
    if (!rec.device || rec.device.generation !== live || (pub && pub.generation !== live)) {
      return {
        abnormal: true,
        message:
          'the node plugin restarted since this volume was staged: its device fails all I/O until the volume is unstaged and staged again',
      };
    }
    const mounted = rec.access.kind === 'mount' || pub !== undefined;
    if (mounted && !(await this.host.isMountPoint(realOf(rec, volumePath))))
      return { abnormal: true, message: `nothing is mounted at ${volumePath}` };
    const device = rec.device.name;
    if (!(await this.host.listLoopDevices()).some((d) => d.name === device))
      return { abnormal: true, message: `loop device ${device} is gone` };
    return { abnormal: false, message: `served by ${device} through the block store` };
  }

  /**
   * Brings the node's view up to the volume's capacity (ControllerExpandVolume grew it): the file's size,
   * the capacity of every loop device of the volume (the staged one and each read-only target's), then the
   * filesystem. Returns the capacity.
   */
  expand(volumeId: string, volumePath: string, requiredBytes: number): Promise<number> {
    return this.mutex.run(volumeId, async () => {
      const volume = this.store.getVolume(volumeId);
      const rec = this.records.get(volumeId);
      if (!rec || !whereIs(rec, volumePath))
        throw new NodeError('not-found', `volume ${volumeId} is not staged or published at volume_path`);
      if (requiredBytes > volume.capacityBytes) {
        throw new NodeError(
          'out-of-range',
          `volume ${volumeId} has ${volume.capacityBytes} bytes, less than the ${requiredBytes} required: ControllerExpandVolume grows it first`,
        );
      }
      if (!rec.device || rec.device.generation !== this.exporter.generation) {
        throw new NodeError(
          'failed-precondition',
          `volume ${volumeId} was staged by an earlier instance of the driver: unstage and stage it again`,
        );
      }
      await this.exporter.grow(volumeId, volume.capacityBytes);
      await this.host.refreshLoopCapacity(rec.device.name);
      for (const pub of Object.values(rec.publishes)) if (pub.device) await this.host.refreshLoopCapacity(pub.device);
      if (rec.access.kind === 'mount' && !rec.readOnly) {
        const fsType = rec.access.fsType;
        if (!isFilesystemType(fsType)) throw new Error(`staged filesystem type ${fsType} is unknown`);
        const staging = stagingReal(rec);
        try {
          await this.host.growFilesystem(rec.device.name, staging, fsType);
        } catch (err) {
          // Online ext4 growth needs CAP_SYS_RESOURCE, which some containers drop. Unpublished, the staging
          // mount is the filesystem's only user and can be grown offline; published, a pod is using it.
          if (!this.host.isResizeRefused(err)) throw err;
          if (Object.keys(rec.publishes).length > 0) {
            throw new NodeError(
              'failed-precondition',
              `ext4 on volume ${volumeId} cannot be grown while published: the kernel refused online resizing (no CAP_SYS_RESOURCE?)`,
            );
          }
          this.logger.warn({ volumeId }, 'online ext4 resize refused; growing it unmounted');
          await this.host.unmountAll(staging);
          await this.host.growExt4Offline(rec.device.name);
          await this.host.mountFilesystem(rec.device.name, staging, fsType, rec.access.mountFlags, rec.readOnly);
        }
      }
      this.logger.info({ volumeId, capacityBytes: volume.capacityBytes }, 'volume expanded on the node');
      return volume.capacityBytes;
    });
  }

  private async deviceRecord(name: string, generation: string): Promise<DeviceRecord> {
    if (!(await this.host.listLoopDevices()).some((d) => d.name === name))
      throw new Error(`loop device ${name} vanished right after it was attached`);
    return { name, generation };
  }
}

/** Whether `volumePath` is where the record has the volume: its staging path or one of its targets. */
function whereIs(rec: StageRecord, volumePath: string): 'staging' | 'target' | undefined {
  if (rec.stagingPath === volumePath) return 'staging';
  return rec.publishes[volumePath] ? 'target' : undefined;
}

/** Where the staging is mounted (records of earlier versions did not resolve it). */
function stagingReal(rec: StageRecord): string {
  return rec.stagingRealPath ?? rec.stagingPath;
}

function publishedReal(targetPath: string, pub: PublishRecord): string {
  return pub.realPath ?? targetPath;
}

/** The resolved place of a path the record has (staging path or target). */
function realOf(rec: StageRecord, volumePath: string): string {
  const pub = rec.publishes[volumePath];
  return pub ? publishedReal(volumePath, pub) : stagingReal(rec);
}

async function isDirectory(p: string): Promise<boolean> {
  return (await fs.promises.lstat(p).catch(() => undefined))?.isDirectory() ?? false;
}

/**
 * Whether loop device `name` is still attached to the volume's file. The kernel names the file by its
 * path in our mount, or, once that dead mount was detached, by its path from the detached mount's root
 * ("/<volumeId>"); the backing inode cannot be read any more then. After a reboot the device is gone or
 * belongs to someone else, and does not match.
 */
function isOurDevice(name: string, volumeId: string, mountDir: string, attached: readonly LoopDevice[]): boolean {
  const paths = [path.join(mountDir, volumeId), `/${volumeId}`];
  return attached.some(
    (a) => a.name === name && paths.some((p) => a.backFile === p || a.backFile === `${p} (deleted)`),
  );
}
