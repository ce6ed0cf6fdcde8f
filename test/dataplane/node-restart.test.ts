/**
 * A node plugin killed (SIGKILL) with staged and published volumes, then started again. The rules: a
 * device of the dead instance fails every I/O (no write can be lost silently or land elsewhere), the
 * new instance knows what was staged (the volume stays undeletable, stats report it abnormal), and
 * unpublishing, unstaging and staging again brings the volume back with everything fsync'd before the kill.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { status } from '@grpc/grpc-js';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { codeOf } from '../support/csi-client.js';
import {
  MiB,
  attachedLoopDevices,
  blockCap,
  dataPlaneSuite,
  directRead,
  directWrite,
  isMounted,
  loopDevicesUnder,
  mountCap,
  sh,
  startNodeEnv,
  type NodeEnv,
} from '../e2e/support/node-env.js';

let env: NodeEnv;

dataPlaneSuite('node plugin restart with staged volumes', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  }, 60_000);
  afterAll(async () => {
    await env?.cleanup();
  }, 60_000);

  it('after SIGKILL, a published device fails I/O; after restart, unpublish + unstage + stage + publish brings back the fsynced data', async () => {
    const block = (
      await env.controller.call('createVolume', {
        name: 'r-block',
        capacityRange: { requiredBytes: BigInt(16 * MiB) },
        volumeCapabilities: [blockCap()],
      })
    ).volume!.volumeId;
    const fsVol = (
      await env.controller.call('createVolume', {
        name: 'r-fs',
        capacityRange: { requiredBytes: BigInt(64 * MiB) },
        volumeCapabilities: [mountCap()],
      })
    ).volume!.volumeId;
    const bStaging = env.path('b-staging');
    const fStaging = env.path('f-staging');
    fs.mkdirSync(bStaging);
    fs.mkdirSync(fStaging);
    const bTarget = env.path('b-target');
    const fTarget = env.path('f-target');
    const stageAndPublish = async () => {
      await env.node.call('nodeStageVolume', {
        volumeId: block,
        stagingTargetPath: bStaging,
        volumeCapability: blockCap(),
      });
      await env.node.call('nodePublishVolume', {
        volumeId: block,
        stagingTargetPath: bStaging,
        targetPath: bTarget,
        volumeCapability: blockCap(),
      });
      await env.node.call('nodeStageVolume', {
        volumeId: fsVol,
        stagingTargetPath: fStaging,
        volumeCapability: mountCap(),
      });
      await env.node.call('nodePublishVolume', {
        volumeId: fsVol,
        stagingTargetPath: fStaging,
        targetPath: fTarget,
        volumeCapability: mountCap(),
      });
    };
    await stageAndPublish();
    const scratch = env.path('scratch');
    const before = Buffer.alloc(64 * 1024, 0xa7);
    directWrite(bTarget, 1 * MiB, before, scratch);
    fs.writeFileSync(`${fTarget}/kept`, 'fsynced before the kill');
    const fd = fs.openSync(`${fTarget}/kept`, 'r+');
    fs.fsyncSync(fd);
    fs.closeSync(fd);

    await env.stopDriver('SIGKILL');

    // The dead instance's device fails writes: nothing is acknowledged that the store never saw.
    expect(() => directWrite(bTarget, 0, Buffer.alloc(4096, 1), scratch)).toThrow();
    expect(
      spawnSync('dd', [`if=${bTarget}`, 'of=/dev/null', 'bs=4096', 'count=1', 'iflag=direct', 'status=none']).status,
    ).not.toBe(0);

    await env.restartDriver();
    // The old FUSE mount is gone from the mount table (lazily detached); no new one until something is staged.
    expect(isMounted(`${env.stateDir}/fuse`)).toBe(false);
    for (const [volumeId, volumePath] of [
      [block, bTarget],
      [fsVol, fStaging],
    ] as const) {
      const stats = await env.node.call('nodeGetVolumeStats', { volumeId, volumePath });
      expect(stats.volumeCondition?.abnormal).toBe(true);
    }
    // Still staged as far as the store is concerned: it cannot be deleted under the pod.
    expect(await codeOf(env.controller.call('deleteVolume', { volumeId: block }))).toBe(status.FAILED_PRECONDITION);
    // Publishing onto a dead staging is refused rather than handing out a dead device again.
    expect(
      await codeOf(
        env.node.call('nodePublishVolume', {
          volumeId: block,
          stagingTargetPath: bStaging,
          targetPath: env.path('b-other'),
          volumeCapability: blockCap(),
        }),
      ),
    ).toBe(status.FAILED_PRECONDITION);

    // What kubelet does when the pod is restarted.
    await env.node.call('nodeUnpublishVolume', { volumeId: block, targetPath: bTarget });
    await env.node.call('nodeUnstageVolume', { volumeId: block, stagingTargetPath: bStaging });
    await env.node.call('nodeUnpublishVolume', { volumeId: fsVol, targetPath: fTarget });
    await env.node.call('nodeUnstageVolume', { volumeId: fsVol, stagingTargetPath: fStaging });
    expect(isMounted(fTarget) || isMounted(fStaging) || isMounted(bTarget)).toBe(false);
    await stageAndPublish();

    expect(
      directRead(bTarget, 16 * MiB, scratch)
        .subarray(1 * MiB, 1 * MiB + before.length)
        .equals(before),
    ).toBe(true);
    expect(fs.readFileSync(`${fTarget}/kept`, 'utf8')).toBe('fsynced before the kill');
    const after = Buffer.alloc(4096, 0x3c);
    directWrite(bTarget, 0, after, scratch);
    expect(directRead(bTarget, 4096, scratch).equals(after)).toBe(true);
    for (const [volumeId, volumePath] of [
      [block, bTarget],
      [fsVol, fTarget],
    ] as const) {
      expect((await env.node.call('nodeGetVolumeStats', { volumeId, volumePath })).volumeCondition?.abnormal).toBe(
        false,
      );
    }

    await env.node.call('nodeUnpublishVolume', { volumeId: block, targetPath: bTarget });
    await env.node.call('nodeUnstageVolume', { volumeId: block, stagingTargetPath: bStaging });
    await env.node.call('nodeUnpublishVolume', { volumeId: fsVol, targetPath: fTarget });
    await env.node.call('nodeUnstageVolume', { volumeId: fsVol, stagingTargetPath: fStaging });
    await env.controller.call('deleteVolume', { volumeId: block });
  }, 120_000);

  it('after SIGKILL, NodeStageVolume on the same path and capability re-stages directly (no unstage needed) when nothing is published', async () => {
    const vol = (
      await env.controller.call('createVolume', {
        name: 'r-restage',
        capacityRange: { requiredBytes: BigInt(64 * MiB) },
        volumeCapabilities: [mountCap()],
      })
    ).volume!.volumeId;
    const staging = env.path('restage');
    fs.mkdirSync(staging);
    await env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: staging, volumeCapability: mountCap() });
    fs.writeFileSync(`${staging}/f`, 'x');
    const fd = fs.openSync(`${staging}/f`, 'r+');
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    await env.stopDriver('SIGKILL');
    await env.restartDriver();
    await env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: staging, volumeCapability: mountCap() });
    expect(fs.readFileSync(`${staging}/f`, 'utf8')).toBe('x');
    expect(
      (await env.node.call('nodeGetVolumeStats', { volumeId: vol, volumePath: staging })).volumeCondition?.abnormal,
    ).toBe(false);
    await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
  }, 120_000);
  it.each([
    ['every record readable: it is detached at restart; the recorded one stays until unstage', false],
    ['a record unreadable: nothing is detached, since what is recorded cannot be known', true],
  ])(
    'after SIGKILL, a loop device over a volume file that no record names (the instance died between attaching and recording it), %s',
    async (_rule, unreadable) => {
      const vol = (
        await env.controller.call('createVolume', {
          name: `r-stray-${unreadable}`,
          capacityRange: { requiredBytes: BigInt(16 * MiB) },
          volumeCapabilities: [blockCap()],
        })
      ).volume!.volumeId;
      const staging = env.path(`stray-staging-${unreadable}`);
      fs.mkdirSync(staging);
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: blockCap(),
      });
      const [recorded] = loopDevicesUnder(env.stateDir)
        .filter((d) => d.backFile.endsWith(`/${vol}`))
        .map((d) => d.name);
      expect(recorded).toBeDefined();
      // What the driver's own attach does, with the record never written.
      const stray = sh('losetup', [
        '--find',
        '--show',
        '--direct-io=on',
        '--read-only',
        `${env.stateDir}/fuse/${vol}`,
      ]).trim();
      const damaged = `${env.stateDir}/node/vol-ffffffffffffffff.json`;
      if (unreadable) fs.writeFileSync(damaged, '{ not json');

      await env.stopDriver('SIGKILL');
      await env.restartDriver();
      // The dead mount is detached at restart: the kernel then names the file "/<volume>", from that mount's root.
      const backFileOf = (device: string) =>
        attachedLoopDevices().find((d) => d.name === device)?.backFile ?? 'not attached';
      const ofVolume = new RegExp(`/${vol}$`);
      expect(backFileOf(recorded!)).toMatch(ofVolume);
      if (unreadable) {
        expect(backFileOf(stray)).toMatch(ofVolume);
        sh('losetup', ['--detach', stray]);
        fs.rmSync(damaged);
      } else {
        expect(backFileOf(stray)).not.toMatch(ofVolume);
        expect(env.stdout()).toContain('detached a loop device an earlier instance attached but never recorded');
      }

      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      expect(backFileOf(recorded!)).not.toMatch(ofVolume);
      await env.controller.call('deleteVolume', { volumeId: vol });
    },
    120_000,
  );
});
