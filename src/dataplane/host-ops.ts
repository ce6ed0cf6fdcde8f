/**
 * What NodeVolumes asks of the host: mounts, loop devices, filesystems on devices, and the volume files it
 * attaches them to. One interface, so the stage/publish/restart state machine can be tested without root
 * against a host that keeps its mounts in memory (test/dataplane/support/fake-host.ts), beside the root
 * tests that run it against the real one. Plain path operations (lstat, mkdir, rmdir of CO paths) are not
 * here: they need no root and the tests give them real temporary directories.
 */
import type { ExposedFile } from './volume-exporter.js';
import {
  bindMount,
  filesystemUsage,
  growExt4Offline,
  growFilesystem,
  isMountPoint,
  isResizeRefused,
  makeFilesystem,
  mountFilesystem,
  probeDevice,
  unmountAll,
  type DeviceSignature,
  type FilesystemType,
  type FilesystemUsage,
} from './filesystems.js';
import {
  attachLoopDevice,
  detachLoopDevice,
  listLoopDevices,
  refreshLoopCapacity,
  type LoopDevice,
} from './loop-devices.js';

export interface HostOps {
  // mounts
  isMountPoint(target: string): Promise<boolean>;
  mountFilesystem(
    device: string,
    target: string,
    type: FilesystemType,
    flags: readonly string[],
    readOnly: boolean,
  ): Promise<void>;
  bindMount(source: string, target: string, readOnly: boolean): Promise<void>;
  /** Unmounts every mount stacked at `target`; `lazy` detaches them at once (dead devices). */
  unmountAll(target: string, options?: { lazy?: boolean }): Promise<void>;
  filesystemUsage(mountPoint: string): Promise<FilesystemUsage>;
  // filesystems on devices
  probeDevice(device: string): Promise<DeviceSignature>;
  makeFilesystem(device: string, type: FilesystemType): Promise<void>;
  growFilesystem(device: string, mountPoint: string, type: FilesystemType): Promise<void>;
  growExt4Offline(device: string): Promise<void>;
  /** Whether a grow failed because the kernel refused online resizing (not the filesystem). */
  isResizeRefused(err: unknown): boolean;
  // loop devices
  attachLoopDevice(file: string, options?: { readOnly?: boolean }): Promise<string>;
  detachLoopDevice(device: string): Promise<void>;
  listLoopDevices(): Promise<LoopDevice[]>;
  refreshLoopCapacity(device: string): Promise<void>;
}

/** The node's volume files (one FUSE mount): what VolumeExporter does, as NodeVolumes uses it. */
export interface VolumeFilesHost {
  /** Where the files are mounted. */
  readonly mountDir: string;
  /** The live mount's generation, undefined while nothing is mounted. */
  readonly generation: string | undefined;
  cleanStale(): Promise<number>;
  filePath(volumeId: string): string;
  expose(volumeId: string): Promise<ExposedFile>;
  hide(volumeId: string): Promise<void>;
  grow(volumeId: string, capacityBytes: number): Promise<void>;
  /** The volume's attributes changed in the store: read its I/O limits again (files that enforce none skip it). */
  limitsChanged?(volumeId: string): void;
  stop(): Promise<void>;
}

/** The real host: util-linux, e2fsprogs and xfsprogs, through filesystems.ts and loop-devices.ts. */
export const realHostOps: HostOps = {
  isMountPoint,
  mountFilesystem,
  bindMount,
  unmountAll,
  filesystemUsage,
  probeDevice,
  makeFilesystem,
  growFilesystem,
  growExt4Offline,
  isResizeRefused,
  attachLoopDevice,
  detachLoopDevice,
  listLoopDevices,
  refreshLoopCapacity,
};
