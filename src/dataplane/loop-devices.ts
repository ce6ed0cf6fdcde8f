/**
 * Loop devices over volume files, through util-linux losetup. Each staged volume gets /dev/loopN with
 * direct I/O on: the loop driver then submits the pod's I/O straight to the FUSE file (no second page
 * cache), so an fsync through the device reaches the block store as an fsync.
 */
import { CommandError, runCommand } from './command.js';

/** What losetup reports of one attached loop device. */
export interface LoopDevice {
  /** /dev/loopN */
  name: string;
  /**
   * The backing file's path as the kernel prints it; for a file of a detached (lazily unmounted) mount,
   * its path from that mount's root.
   */
  backFile: string;
  readOnly: boolean;
  directIo: boolean;
  autoclear: boolean;
}

interface LosetupJson {
  loopdevices?: Array<Record<string, unknown>>;
}

const DEVICE_PATTERN = /^\/dev\/loop\d+$/;

/** Whether `name` looks like a loop device node (what records and requests may name). */
export function isLoopDeviceName(name: string): boolean {
  return DEVICE_PATTERN.test(name);
}

function checkDevice(device: string): void {
  if (!isLoopDeviceName(device)) throw new RangeError(`not a loop device: ${JSON.stringify(device)}`);
}

/**
 * Attaches `file` to the first free loop device, with direct I/O; `readOnly` makes the device refuse
 * writes (EPERM) whatever the file allows. Resolves to /dev/loopN.
 */
export async function attachLoopDevice(file: string, options: { readOnly?: boolean } = {}): Promise<string> {
  const args = ['--find', '--show', '--direct-io=on'];
  if (options.readOnly) args.push('--read-only');
  args.push(file);
  const { stdout } = await runCommand('losetup', args);
  const device = stdout.trim();
  if (!isLoopDeviceName(device)) throw new Error(`losetup printed ${JSON.stringify(device)}, not a loop device`);
  return device;
}

/**
 * Detaches a loop device. If something still has it open (a mounted filesystem, a pod), the kernel
 * detaches it when the last user closes it. A device that is already gone is not an error.
 */
export async function detachLoopDevice(device: string): Promise<void> {
  checkDevice(device);
  try {
    await runCommand('losetup', ['--detach', device]);
  } catch (err) {
    // ENXIO: not attached (any more); ENOENT: no such node.
    if (err instanceof CommandError && /No such device|No such file/i.test(err.stderr)) return;
    throw err;
  }
}

/** Every attached loop device (from sysfs; losetup stats nothing for these columns, so a dead mount cannot hang it). */
export async function listLoopDevices(): Promise<LoopDevice[]> {
  const { stdout } = await runCommand('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE,RO,DIO,AUTOCLEAR']);
  if (!stdout.trim()) return [];
  const parsed = JSON.parse(stdout) as LosetupJson;
  return (parsed.loopdevices ?? []).map((d) => ({
    name: String(d.name ?? ''),
    backFile: String(d['back-file'] ?? ''),
    readOnly: d.ro === true || d.ro === '1',
    directIo: d.dio === true || d.dio === '1',
    autoclear: d.autoclear === true || d.autoclear === '1',
  }));
}

/** One attached loop device by name, or undefined if it is not attached. */
export async function loopDevice(device: string): Promise<LoopDevice | undefined> {
  checkDevice(device);
  return (await listLoopDevices()).find((d) => d.name === device);
}

/** Re-reads the backing file's size (`losetup -c`), after the file grew. */
export async function refreshLoopCapacity(device: string): Promise<void> {
  checkDevice(device);
  await runCommand('losetup', ['--set-capacity', device]);
}
