/**
 * The node plugin on a full state filesystem (issue 15 item 3, node part), on a real small filesystem: a
 * 64 MiB ext4 image, loop-mounted by the test as the driver's state directory, filled to the last block.
 * The rules: taking volumes down (NodeUnpublishVolume, NodeUnstageVolume) needs no new space and works;
 * what needs space to be recorded (NodeStageVolume, NodePublishVolume) is RESOURCE_EXHAUSTED, and works
 * again once space is freed.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { codeOf } from '../support/csi-client.js';
import {
  MiB,
  blockCap,
  dataPlaneSuite,
  isMounted,
  mountCap,
  sh,
  startNodeEnv,
  type NodeEnv,
} from '../e2e/support/node-env.js';

let env: NodeEnv | undefined;
let imageDir: string;
let mountPoint: string;

/** Fills the filesystem at `dir` until a write of even one byte fails with ENOSPC. */
let fillRound = 0;

function fill(dir: string): string[] {
  const fillers: string[] = [];
  fillRound++;
  for (const chunk of [1 * MiB, 64 * 1024, 4096, 1]) {
    // One file per chunk size, written until the disk refuses it.
    const file = path.join(dir, `filler-${fillRound}-${chunk}`);
    try {
      const fd = fs.openSync(file, 'w');
      fillers.push(file);
      try {
        for (;;) fs.writeSync(fd, Buffer.alloc(chunk));
      } finally {
        fs.closeSync(fd);
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
    }
  }
  return fillers;
}

dataPlaneSuite('node plugin on a full state filesystem', () => {
  beforeAll(async () => {
    imageDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-fulldisk-'));
    const image = path.join(imageDir, 'state.img');
    mountPoint = path.join(imageDir, 'mnt');
    fs.mkdirSync(mountPoint);
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 64 * MiB);
    // -m 0: no blocks reserved for root (the driver is root; reserved blocks would hide the full disk).
    sh('mkfs.ext4', ['-q', '-F', '-m', '0', image]);
    sh('mount', ['-o', 'loop', image, mountPoint]);
    env = await startNodeEnv([], { stateDir: path.join(mountPoint, 'state') });
  }, 60_000);
  afterAll(async () => {
    await env?.cleanup();
    if (mountPoint && isMounted(mountPoint)) sh('umount', ['-l', mountPoint]);
    if (imageDir) fs.rmSync(imageDir, { recursive: true, force: true });
  }, 60_000);

  it('NodeUnpublishVolume and NodeUnstageVolume work on a full state disk; NodeStageVolume and NodePublishVolume are RESOURCE_EXHAUSTED until space is freed', async () => {
    const e = env!;
    const create = async (name: string, cap: ReturnType<typeof blockCap> | ReturnType<typeof mountCap>) =>
      (
        await e.controller.call('createVolume', {
          name,
          capacityRange: { requiredBytes: BigInt(8 * MiB) },
          volumeCapabilities: [cap],
        })
      ).volume!.volumeId;
    const block = await create('full-block', blockCap(7));
    const fsVol = await create('full-fs', mountCap());
    const later = await create('full-later', blockCap());
    fs.mkdirSync(e.path('pods'), { recursive: true });
    const bStaging = e.path('b-staging');
    const fStaging = e.path('f-staging');
    const lStaging = e.path('l-staging');
    for (const d of [bStaging, fStaging, lStaging]) fs.mkdirSync(d);
    const rw = e.path('pods', 'b-rw');
    const ro = e.path('pods', 'b-ro');
    const fTarget = e.path('pods', 'f-target');
    await e.node.call('nodeStageVolume', {
      volumeId: block,
      stagingTargetPath: bStaging,
      volumeCapability: blockCap(7),
    });
    await e.node.call('nodePublishVolume', {
      volumeId: block,
      stagingTargetPath: bStaging,
      targetPath: rw,
      volumeCapability: blockCap(7),
    });
    await e.node.call('nodePublishVolume', {
      volumeId: block,
      stagingTargetPath: bStaging,
      targetPath: ro,
      volumeCapability: blockCap(7),
      readonly: true,
    });
    await e.node.call('nodeStageVolume', {
      volumeId: fsVol,
      stagingTargetPath: fStaging,
      volumeCapability: mountCap(),
    });
    await e.node.call('nodePublishVolume', {
      volumeId: fsVol,
      stagingTargetPath: fStaging,
      targetPath: fTarget,
      volumeCapability: mountCap(),
    });
    fs.writeFileSync(`${fTarget}/before`, 'written before the disk filled');
    sh('sync', []);

    const fillers = fill(mountPoint);
    expect(() => fs.writeFileSync(path.join(mountPoint, 'probe'), 'x')).toThrow(/ENOSPC/);

    // Taking volumes down needs no space.
    await e.node.call('nodeUnpublishVolume', { volumeId: block, targetPath: ro });
    await e.node.call('nodeUnpublishVolume', { volumeId: block, targetPath: rw });
    await e.node.call('nodeUnstageVolume', { volumeId: block, stagingTargetPath: bStaging });
    await e.node.call('nodeUnpublishVolume', { volumeId: fsVol, targetPath: fTarget });
    expect(isMounted(rw) || isMounted(ro) || isMounted(fTarget)).toBe(false);

    // Taking down freed the blocks of its records: fill those too.
    fillers.push(...fill(mountPoint));
    // Recording a new staging or publication needs space: RESOURCE_EXHAUSTED, and nothing is left half done.
    expect(
      await codeOf(
        e.node.call('nodeStageVolume', { volumeId: later, stagingTargetPath: lStaging, volumeCapability: blockCap() }),
      ),
    ).toBe(status.RESOURCE_EXHAUSTED);
    expect(
      await codeOf(
        e.node.call('nodePublishVolume', {
          volumeId: fsVol,
          stagingTargetPath: fStaging,
          targetPath: fTarget,
          volumeCapability: mountCap(),
        }),
      ),
    ).toBe(status.RESOURCE_EXHAUSTED);
    expect(isMounted(fTarget)).toBe(false);
    await e.node.call('nodeUnstageVolume', { volumeId: fsVol, stagingTargetPath: fStaging });
    expect(isMounted(fStaging)).toBe(false);

    for (const f of fillers) fs.rmSync(f);
    await e.node.call('nodeStageVolume', {
      volumeId: later,
      stagingTargetPath: lStaging,
      volumeCapability: blockCap(),
    });
    await e.node.call('nodeStageVolume', {
      volumeId: fsVol,
      stagingTargetPath: fStaging,
      volumeCapability: mountCap(),
    });
    expect(fs.readFileSync(`${fStaging}/before`, 'utf8')).toBe('written before the disk filled');
    await e.node.call('nodeUnstageVolume', { volumeId: fsVol, stagingTargetPath: fStaging });
    await e.node.call('nodeUnstageVolume', { volumeId: later, stagingTargetPath: lStaging });
  }, 120_000);
});
