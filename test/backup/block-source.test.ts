/**
 * A backup's source: a block device is read with O_DIRECT into page-aligned chunk buffers (a backup's reads
 * are not read again, so the device's page cache would only add a copy); other buffers, and image files,
 * are read through the page cache. The bytes are the source's either way. A restore's target on a block
 * device is written the same way: aligned writes with O_DIRECT, the rest through the page cache.
 */
import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it, vi } from 'vitest';
import { openSource, openTarget } from '../../src/backup/block-target.js';
import { RepositoryError } from '../../src/backup/repository.js';
import { allocAligned } from '../../src/backup/direct-io.js';
import { dataPlaneSuite } from '../e2e/support/node-env.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

dataPlaneSuite('backup source on a block device', () => {
  let dir: string;
  let image: string;
  let device: string;
  const data = randomFillSync(Buffer.alloc(SIZE));

  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'block-source-'));
    image = path.join(dir, 'image');
    fs.writeFileSync(image, data);
    device = execFileSync('losetup', ['--show', '-f', image], { encoding: 'utf8' }).trim();
  });
  afterAll(() => {
    if (device) execFileSync('losetup', ['-d', device]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("a block device reads aligned chunk buffers with O_DIRECT, and they hold the device's bytes", async () => {
    const source = await openSource(device, SIZE);
    expect(source.direct).toBe(true);
    const [a, b] = allocAligned(4 * MiB, 2);
    await source.readInto(a!, 0);
    await source.readInto(b!, 4 * MiB);
    await source.close();
    expect(Buffer.concat([a!, b!]).equals(data)).toBe(true);
  });

  it('every byte comes from the device that was opened and checked, even if the path is swapped meanwhile', async () => {
    const link = path.join(dir, 'source-link');
    const other = path.join(dir, 'other.img');
    fs.writeFileSync(other, Buffer.alloc(SIZE, 0x5a));
    fs.symlinkSync(device, link);
    // Right after the source is opened, its path is pointed at another file.
    const open = fs.promises.open;
    const spy = vi.spyOn(fs.promises, 'open').mockImplementation(async (file, flags, mode) => {
      const handle = await open(file, flags, mode);
      if (file === link) {
        fs.rmSync(link);
        fs.symlinkSync(other, link);
      }
      return handle;
    });
    let source: Awaited<ReturnType<typeof openSource>>;
    try {
      source = await openSource(link, SIZE);
    } finally {
      spy.mockRestore();
    }
    expect(source.direct).toBe(true);
    const [a] = allocAligned(SIZE, 1);
    await source.readInto(a!, 0);
    await source.close();
    expect(a!.equals(data)).toBe(true);
  });

  it('unaligned buffers and offsets are read through the page cache, with the same bytes', async () => {
    const source = await openSource(device, SIZE);
    const whole = Buffer.alloc(SIZE);
    await source.readInto(whole.subarray(0, 3 * MiB + 512), 0);
    await source.readInto(whole.subarray(3 * MiB + 512), 3 * MiB + 512);
    await source.close();
    expect(whole.equals(data)).toBe(true);
  });

  it('an image file is read through the page cache', async () => {
    const source = await openSource(image, SIZE);
    expect(source.direct).toBe(false);
    const [a] = allocAligned(SIZE, 1);
    await source.readInto(a!, 0);
    await source.close();
    expect(a!.equals(data)).toBe(true);
  });

  it('a restore target on a block device takes aligned writes with O_DIRECT and the rest through the page cache; it holds every byte either way', async () => {
    const target = await openTarget(device, SIZE);
    expect(target.direct).toBe(true);
    const expected = randomFillSync(Buffer.alloc(SIZE));
    const [aligned] = allocAligned(4 * MiB, 1);
    expected.copy(aligned!, 0, 0, 4 * MiB);
    // Aligned (O_DIRECT), then unaligned pieces around and between aligned ones, as a restore's map cuts them.
    await target.write(0, aligned!);
    await target.write(4 * MiB, expected.subarray(4 * MiB, 4 * MiB + 1000));
    await target.write(4 * MiB + 1000, expected.subarray(4 * MiB + 1000, 5 * MiB));
    aligned!.set(expected.subarray(5 * MiB, 8 * MiB));
    await target.write(5 * MiB, aligned!.subarray(0, 3 * MiB));
    await target.sync();
    await target.close();
    const back = Buffer.alloc(SIZE);
    const fd = fs.openSync(device, 'r');
    fs.readSync(fd, back, 0, SIZE, 0);
    fs.closeSync(fd);
    expect(back.equals(expected)).toBe(true);
  });

  it('a restore target that is a mounted block device is refused (a usage error), and nothing is written to it', async () => {
    const image2 = path.join(dir, 'mounted-image');
    const mnt = path.join(dir, 'mnt');
    fs.writeFileSync(image2, Buffer.alloc(SIZE));
    fs.mkdirSync(mnt);
    const loop = execFileSync('losetup', ['--show', '-f', image2], { encoding: 'utf8' }).trim();
    try {
      execFileSync('mkfs.ext4', ['-q', loop]);
      execFileSync('mount', [loop, mnt]);
      try {
        const before = fs.readFileSync(image2);
        const err = await openTarget(loop, SIZE).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(RepositoryError);
        expect((err as RepositoryError).kind).toBe('usage');
        expect((err as Error).message).toMatch(/is in use \(mounted/);
        expect(fs.readFileSync(image2).equals(before)).toBe(true);
      } finally {
        execFileSync('umount', [mnt]);
      }
    } finally {
      execFileSync('losetup', ['-d', loop]);
    }
  });
});
