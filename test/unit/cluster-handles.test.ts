/**
 * Multi-node handles (docs/adr/0008): a handle names the node that owns the object, and routing finds every
 * handle in a CSI message by the field it is in.
 */
import { create, type DescMessage } from '@bufbuild/protobuf';
import { nestedTypes } from '@bufbuild/protobuf/reflect';
import { describe, expect, it } from 'vitest';
import { NOT_OBJECT_ID_FIELDS, OBJECT_ID_FIELDS, idsIn, mapIds } from '../../src/cluster/id-fields.js';
import { ownedHandle, ownerNodeIdProblem, ownerOf, withoutOwner } from '../../src/cluster/node-handles.js';
import {
  CreateSnapshotResponseSchema,
  CreateVolumeGroupSnapshotRequestSchema,
  CreateVolumeRequestSchema,
  file_csi_v1_csi,
  GetMetadataDeltaRequestSchema,
  GetMetadataDeltaResponseSchema,
  ListVolumesResponseSchema,
  NodeGetInfoResponseSchema,
} from '../../src/gen/csi/v1/csi_pb.js';

describe('owner suffix of handles', () => {
  it('names the owner after the last @, and only a valid node ID counts', () => {
    expect(ownerOf('vol-0123456789abcdef@worker-1')).toBe('worker-1');
    expect(ownerOf('snap-0123456789abcdef@ip-10-0-1-2.ec2.internal')).toBe('ip-10-0-1-2.ec2.internal');
    // Handles from single mode and old stores have no owner: they are local wherever they arrive.
    expect(ownerOf('vol-0123456789abcdef')).toBeUndefined();
    for (const malformed of ['vol-x@', '@node-a', 'vol-x@-node', 'vol-x@node a', 'vol-x@node/../a']) {
      expect(ownerOf(malformed), malformed).toBeUndefined();
    }
  });

  it('takes off only the given node suffix, and puts it back', () => {
    const handle = ownedHandle('vol-0123456789abcdef', 'node-a');
    expect(handle).toBe('vol-0123456789abcdef@node-a');
    expect(withoutOwner(handle, 'node-a')).toBe('vol-0123456789abcdef');
    expect(withoutOwner(handle, 'node-b')).toBe(handle);
    expect(withoutOwner('vol-0123456789abcdef', 'node-a')).toBe('vol-0123456789abcdef');
  });

  it('refuses node IDs that cannot be put in a handle of at most 128 bytes', () => {
    expect(ownerNodeIdProblem('kind-worker2')).toBeUndefined();
    expect(ownerNodeIdProblem('a'.repeat(100))).toBeUndefined();
    expect(ownerNodeIdProblem('a'.repeat(101))).toMatch(/1 to 100 characters/);
    expect(ownerNodeIdProblem('node@a')).toBeDefined();
    expect(ownerNodeIdProblem('')).toBeDefined();
    // The longest engine ID is a group's: group- and 16 hex digits.
    expect(Buffer.byteLength(ownedHandle(`group-${'f'.repeat(16)}`, 'a'.repeat(100)))).toBeLessThanOrEqual(128);
  });
});

describe('object ID fields of CSI messages', () => {
  it('every *_id or *_ids field of the CSI proto is classified as an object handle or not', () => {
    const unclassified: string[] = [];
    for (const type of nestedTypes(file_csi_v1_csi)) {
      if (type.kind !== 'message') continue;
      for (const field of (type as DescMessage).fields) {
        if (!/_ids?$/.test(field.name)) continue;
        if (!OBJECT_ID_FIELDS.has(field.name) && !NOT_OBJECT_ID_FIELDS.has(field.name)) {
          unclassified.push(`${type.typeName}.${field.name}`);
        }
      }
    }
    expect(unclassified).toEqual([]);
  });

  it('finds handles in plain fields, lists, oneofs and nested messages, and leaves node IDs and maps alone', () => {
    const delta = create(GetMetadataDeltaRequestSchema, { baseSnapshotId: 'snap-a@n1', targetSnapshotId: 'snap-b@n1' });
    expect(idsIn(GetMetadataDeltaRequestSchema, delta)).toEqual(['snap-a@n1', 'snap-b@n1']);
    const restore = create(CreateVolumeRequestSchema, {
      name: 'pvc-1',
      parameters: { volume_id: 'not-a-handle' },
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: 'snap-c@n2' } } },
    });
    expect(idsIn(CreateVolumeRequestSchema, restore)).toEqual(['snap-c@n2']);
    const group = create(CreateVolumeGroupSnapshotRequestSchema, { sourceVolumeIds: ['vol-1@n1', 'vol-2@n1'] });
    expect(idsIn(CreateVolumeGroupSnapshotRequestSchema, group)).toEqual(['vol-1@n1', 'vol-2@n1']);
    const info = create(NodeGetInfoResponseSchema, { nodeId: 'n1' });
    expect(idsIn(NodeGetInfoResponseSchema, info)).toEqual([]);
    // Metadata replies hold no handles: routing never walks them (the hot path).
    expect(idsIn(GetMetadataDeltaResponseSchema, create(GetMetadataDeltaResponseSchema))).toEqual([]);
  });

  it('rewrites every non-empty handle of a reply in place, including init shapes', () => {
    const reply = create(CreateSnapshotResponseSchema, {
      snapshot: { snapshotId: 'snap-1', sourceVolumeId: 'vol-1', groupSnapshotId: '' },
    });
    mapIds(CreateSnapshotResponseSchema, reply, (id) => `${id}@n1`);
    expect(reply.snapshot).toMatchObject({ snapshotId: 'snap-1@n1', sourceVolumeId: 'vol-1@n1', groupSnapshotId: '' });
    const list = {
      entries: [
        {
          volume: {
            volumeId: 'vol-2',
            contentSource: { type: { case: 'volume', value: { volumeId: 'vol-1' } } },
          },
          status: { publishedNodeIds: ['n1'] },
        },
      ],
    };
    mapIds(ListVolumesResponseSchema, list, (id) => `${id}@n1`);
    expect(list.entries[0]!.volume.volumeId).toBe('vol-2@n1');
    expect(list.entries[0]!.volume.contentSource.type.value.volumeId).toBe('vol-1@n1');
    expect(list.entries[0]!.status.publishedNodeIds).toEqual(['n1']);
  });
});
