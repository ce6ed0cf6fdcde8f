/**
 * A few CSI calls against a running `cbt-csi serve`, as docs/quickstart-local.md shows:
 *   node --import tsx docs/examples/local-client.ts unix:///tmp/cbt/csi.sock
 * It creates a volume, snapshots it twice and lists the blocks that changed between the two snapshots
 * (none: writing needs the node data plane, see the quickstart). It removes what it created.
 */
import { VolumeCapability_AccessMode_Mode as Mode } from '../../src/gen/csi/v1/csi_pb.js';
import { Controller, Identity, SnapshotMetadata } from '../../src/gen/csi/v1/csi_pb.js';
import { ServiceClient } from '../../test/support/csi-client.js';

const target = process.argv[2] ?? process.env.CSI_ENDPOINT;
if (!target) {
  process.stderr.write('usage: local-client.ts unix:///path/to/csi.sock\n');
  process.exit(2);
}

const identity = new ServiceClient(Identity, target);
const controller = new ServiceClient(Controller, target);
const metadata = new ServiceClient(SnapshotMetadata, target);

try {
  const info = await identity.call('getPluginInfo', {});
  console.log(`plugin ${info.name} ${info.vendorVersion}`);

  const name = `quickstart-${process.pid}`;
  const { volume } = await controller.call('createVolume', {
    name,
    capacityRange: { requiredBytes: 64n * 1024n * 1024n },
    volumeCapabilities: [{ accessType: { case: 'block', value: {} }, accessMode: { mode: Mode.SINGLE_NODE_WRITER } }],
    parameters: { blockSize: '4096', metadataStyle: 'VARIABLE' },
  });
  const volumeId = volume!.volumeId;
  console.log(`volume ${volumeId}: ${volume!.capacityBytes} bytes`);

  const first = (await controller.call('createSnapshot', { name: `${name}-a`, sourceVolumeId: volumeId })).snapshot!;
  const second = (await controller.call('createSnapshot', { name: `${name}-b`, sourceVolumeId: volumeId })).snapshot!;
  console.log(`snapshots ${first.snapshotId} ${second.snapshotId}`);

  let changed = 0;
  for await (const response of metadata.stream('getMetadataDelta', {
    baseSnapshotId: first.snapshotId,
    targetSnapshotId: second.snapshotId,
  })) {
    changed += response.blockMetadata.length;
  }
  console.log(`changed extents between the snapshots: ${changed}`);

  await controller.call('deleteSnapshot', { snapshotId: second.snapshotId });
  await controller.call('deleteSnapshot', { snapshotId: first.snapshotId });
  await controller.call('deleteVolume', { volumeId });
  console.log('cleaned up');
} finally {
  identity.close();
  controller.close();
  metadata.close();
}
