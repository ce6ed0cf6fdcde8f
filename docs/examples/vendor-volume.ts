/**
 * The CSI calls the local vendor walk-through needs (docs/for-backup-vendors.md), against a running
 * `cbt-csi serve` started as root (publishing a block volume needs the node data plane):
 *
 *   vendor-volume.ts ENDPOINT create NAME [PROFILE [OBJECT_SIZE]]   block volume, staged and published; prints its ID and device
 *   vendor-volume.ts ENDPOINT snapshot VOLUME_ID NAME                prints the snapshot ID
 *   vendor-volume.ts ENDPOINT restore SNAPSHOT_ID NAME               new volume from the snapshot, published; prints its device
 *   vendor-volume.ts ENDPOINT release VOLUME_ID NAME                 unpublish and unstage
 *
 * Devices are published under /tmp/cbt/pods/NAME (staging under /tmp/cbt/staging/NAME).
 */
import fs from 'node:fs';
import { VolumeCapability_AccessMode_Mode as Mode } from '../../src/gen/csi/v1/csi_pb.js';
import { Controller, Node } from '../../src/gen/csi/v1/csi_pb.js';
import { ServiceClient } from '../../test/support/csi-client.js';

const [target, command, ...args] = process.argv.slice(2);
if (!target || !command) {
  process.stderr.write('usage: vendor-volume.ts unix:///path/csi.sock create|snapshot|restore|release ...\n');
  process.exit(2);
}
const controller = new ServiceClient(Controller, target);
const node = new ServiceClient(Node, target);
const blockCap = { accessType: { case: 'block' as const, value: {} }, accessMode: { mode: Mode.SINGLE_NODE_WRITER } };
const paths = (name: string) => ({ staging: `/tmp/cbt/staging/${name}`, target: `/tmp/cbt/pods/${name}` });

async function publish(volumeId: string, name: string): Promise<string> {
  const p = paths(name);
  fs.mkdirSync(p.staging, { recursive: true });
  fs.mkdirSync('/tmp/cbt/pods', { recursive: true });
  await node.call('nodeStageVolume', { volumeId, stagingTargetPath: p.staging, volumeCapability: blockCap });
  await node.call('nodePublishVolume', {
    volumeId,
    stagingTargetPath: p.staging,
    targetPath: p.target,
    volumeCapability: blockCap,
  });
  return p.target;
}

try {
  if (command === 'create') {
    const [name, profile, objectSize] = args;
    const parameters: Record<string, string> = {};
    if (profile) parameters.metadataProfile = profile;
    if (objectSize) parameters.objectSize = objectSize;
    const { volume } = await controller.call('createVolume', {
      name: name!,
      capacityRange: { requiredBytes: 64n * 1024n * 1024n },
      volumeCapabilities: [blockCap],
      parameters,
    });
    console.log(`volume ${volume!.volumeId} device ${await publish(volume!.volumeId, name!)}`);
  } else if (command === 'snapshot') {
    const [volumeId, name] = args;
    console.log(
      (await controller.call('createSnapshot', { name: name!, sourceVolumeId: volumeId! })).snapshot!.snapshotId,
    );
  } else if (command === 'restore') {
    const [snapshotId, name] = args;
    const { volume } = await controller.call('createVolume', {
      name: name!,
      capacityRange: { requiredBytes: 64n * 1024n * 1024n },
      volumeCapabilities: [blockCap],
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snapshotId! } } },
    });
    console.log(`volume ${volume!.volumeId} device ${await publish(volume!.volumeId, name!)}`);
  } else if (command === 'release') {
    const [volumeId, name] = args;
    const p = paths(name!);
    await node.call('nodeUnpublishVolume', { volumeId: volumeId!, targetPath: p.target });
    await node.call('nodeUnstageVolume', { volumeId: volumeId!, stagingTargetPath: p.staging });
    console.log('released');
  } else {
    throw new Error(`unknown command ${command}`);
  }
} finally {
  controller.close();
  node.close();
}
