/**
 * A host for NodeVolumes that keeps mounts, loop devices and filesystems in memory, so the stage/publish/
 * restart state machine can be tested without root. It is a test double of the kernel and the tools only:
 * the paths NodeVolumes creates and removes are real (temporary directories), and the same state machine
 * runs against the real host in node-service.test.ts, node-restart.test.ts and the e2e tests.
 *
 * It behaves like the real tools where NodeVolumes depends on it: mount(8) needs an existing target of the
 * right type, a bind mount of a device needs a non-directory, losetup needs an exposed file, and a killed
 * instance's devices keep their numbers but name their file "/<volumeId>" (its detached mount's root).
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { BlockStore } from '../../../storage-engine/index.js';
import type { HostOps, VolumeFilesHost } from '../../../src/dataplane/host-ops.js';
import type { DeviceSignature, FilesystemType, FilesystemUsage } from '../../../src/dataplane/filesystems.js';
import type { LoopDevice } from '../../../src/dataplane/loop-devices.js';
import type { ExposedFile } from '../../../src/dataplane/volume-exporter.js';

export interface FakeMount {
  source: string;
  target: string;
  fsType: string;
  readOnly: boolean;
}

export interface FakeDevice {
  backFile: string;
  readOnly: boolean;
  sizeBytes: number;
}

type Op = keyof HostOps;

export class FakeHost implements HostOps {
  readonly mounts: FakeMount[] = [];
  readonly devices = new Map<string, FakeDevice>();
  /** Filesystem type on each volume file (kept by volume ID: the same bytes whichever device shows them). */
  readonly filesystems = new Map<string, FilesystemType>();
  /** Sizes of the exposed volume files, by path. */
  readonly files = new Map<string, number>();
  /** Every call, in order: [operation, first argument]. */
  readonly calls: Array<[Op, string]> = [];
  private nextLoop = 900;
  private readonly failures = new Map<Op, Error>();

  /** Makes the next call of `op` fail with `err`. */
  failNext(op: Op, err: Error): void {
    this.failures.set(op, err);
  }

  private enter(op: Op, arg: string): void {
    this.calls.push([op, arg]);
    const err = this.failures.get(op);
    if (err) {
      this.failures.delete(op);
      throw err;
    }
  }

  mountsAt(target: string): FakeMount[] {
    return this.mounts.filter((m) => m.target === path.resolve(target));
  }

  async isMountPoint(target: string): Promise<boolean> {
    return this.mountsAt(target).length > 0;
  }

  async mountFilesystem(
    device: string,
    target: string,
    type: FilesystemType,
    flags: readonly string[],
    readOnly: boolean,
  ): Promise<void> {
    this.enter('mountFilesystem', target);
    const dev = this.devices.get(device);
    if (!dev) throw new Error(`mount: ${device}: no such device`);
    if (this.filesystems.get(volumeOf(dev.backFile)) !== type) throw new Error(`mount: ${device}: wrong fs type`);
    if (!fs.statSync(target).isDirectory()) throw new Error(`mount: ${target}: not a directory`);
    this.mounts.push({
      source: device,
      target: path.resolve(target),
      fsType: type,
      readOnly: readOnly || flags.includes('ro'),
    });
  }

  async bindMount(source: string, target: string, readOnly: boolean): Promise<void> {
    this.enter('bindMount', target);
    const st = fs.lstatSync(target);
    const deviceSource = this.devices.has(source);
    if (deviceSource ? st.isDirectory() : !st.isDirectory())
      throw new Error(`mount --bind ${source} ${target}: not a directory / is a directory`);
    if (!deviceSource && !this.mounts.some((m) => m.target === path.resolve(source)))
      throw new Error(`bind source ${source} is not a mount in this test`);
    this.mounts.push({ source, target: path.resolve(target), fsType: 'bind', readOnly });
  }

  async unmountAll(target: string, options: { lazy?: boolean } = {}): Promise<void> {
    this.enter('unmountAll', `${target}${options.lazy ? ' (lazy)' : ''}`);
    for (let i = this.mounts.length - 1; i >= 0; i--)
      if (this.mounts[i]!.target === path.resolve(target)) this.mounts.splice(i, 1);
  }

  async filesystemUsage(mountPoint: string): Promise<FilesystemUsage> {
    const mount = this.mountsAt(mountPoint).at(-1);
    if (!mount) throw new Error(`${mountPoint} is not mounted`);
    return { totalBytes: 1, availableBytes: 1, usedBytes: 0, totalInodes: 1, availableInodes: 1, usedInodes: 0 };
  }

  async probeDevice(device: string): Promise<DeviceSignature> {
    this.enter('probeDevice', device);
    const dev = this.devices.get(device);
    if (!dev) throw new Error(`blkid: ${device}: no such device`);
    return { type: this.filesystems.get(volumeOf(dev.backFile)), partitionTable: undefined };
  }

  async makeFilesystem(device: string, type: FilesystemType): Promise<void> {
    this.enter('makeFilesystem', device);
    const dev = this.devices.get(device);
    if (!dev || dev.readOnly) throw new Error(`mkfs: ${device}: cannot write`);
    this.filesystems.set(volumeOf(dev.backFile), type);
  }

  async growFilesystem(device: string, _mountPoint: string, _type: FilesystemType): Promise<void> {
    this.enter('growFilesystem', device);
  }

  async growExt4Offline(device: string): Promise<void> {
    this.enter('growExt4Offline', device);
  }

  isResizeRefused(err: unknown): boolean {
    return err instanceof Error && err.message.includes('Permission denied to resize');
  }

  async attachLoopDevice(file: string, options: { readOnly?: boolean } = {}): Promise<string> {
    this.enter('attachLoopDevice', file);
    const size = this.files.get(file);
    if (size === undefined) throw new Error(`losetup: ${file}: no such file`);
    const name = `/dev/loop${this.nextLoop++}`;
    this.devices.set(name, { backFile: file, readOnly: options.readOnly ?? false, sizeBytes: size });
    return name;
  }

  async detachLoopDevice(device: string): Promise<void> {
    this.enter('detachLoopDevice', device);
    this.devices.delete(device);
  }

  async listLoopDevices(): Promise<LoopDevice[]> {
    return [...this.devices].map(([name, d]) => ({
      name,
      backFile: d.backFile,
      readOnly: d.readOnly,
      directIo: true,
      autoclear: false,
    }));
  }

  async refreshLoopCapacity(device: string): Promise<void> {
    this.enter('refreshLoopCapacity', device);
    const dev = this.devices.get(device);
    if (!dev) throw new Error(`losetup -c ${device}: no such device`);
    const size = this.files.get(dev.backFile);
    if (size !== undefined) dev.sizeBytes = size;
  }

  /** A reboot: every mount and device is gone; device numbering starts again. */
  reboot(): void {
    this.mounts.length = 0;
    this.devices.clear();
    this.files.clear();
    this.nextLoop = 900;
  }

  /** Attaches a device of someone else (another program's file) under the next free number. */
  attachForeign(file: string): string {
    const name = `/dev/loop${this.nextLoop++}`;
    this.devices.set(name, { backFile: file, readOnly: false, sizeBytes: 0 });
    return name;
  }
}

/** The volume files of one driver instance, kept by the fake host; `kill()` is that instance dying. */
export class FakeVolumeFiles implements VolumeFilesHost {
  private live: string | undefined;

  constructor(
    private readonly host: FakeHost,
    private readonly store: BlockStore,
    readonly mountDir: string,
  ) {}

  get generation(): string | undefined {
    return this.live;
  }

  async cleanStale(): Promise<number> {
    return 0;
  }

  filePath(volumeId: string): string {
    return path.join(this.mountDir, volumeId);
  }

  async expose(volumeId: string): Promise<ExposedFile> {
    this.live ??= randomUUID();
    this.host.files.set(this.filePath(volumeId), this.store.getVolume(volumeId).capacityBytes);
    return { path: this.filePath(volumeId), generation: this.live };
  }

  async hide(volumeId: string): Promise<void> {
    this.host.files.delete(this.filePath(volumeId));
  }

  async grow(volumeId: string, capacityBytes: number): Promise<void> {
    if (!this.host.files.has(this.filePath(volumeId))) throw new Error(`volume ${volumeId} is not exposed`);
    this.host.files.set(this.filePath(volumeId), capacityBytes);
  }

  async stop(): Promise<void> {
    this.kill();
  }

  /**
   * The instance's FUSE connection dies: its files are gone, and the kernel names the files of devices
   * still attached to them from the detached mount's root.
   */
  kill(): void {
    this.live = undefined;
    for (const file of [...this.host.files.keys()])
      if (path.dirname(file) === this.mountDir) this.host.files.delete(file);
    for (const dev of this.host.devices.values()) {
      if (path.dirname(dev.backFile) === this.mountDir) dev.backFile = `/${path.basename(dev.backFile)}`;
    }
  }
}

function volumeOf(backFile: string): string {
  return path.basename(backFile);
}
