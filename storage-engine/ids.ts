/** Opaque object IDs. They are random, fixed-format strings; anything else is treated as unknown, so
 * no caller-supplied string ever reaches a file path or a query that could misbehave. */
import { randomBytes } from 'node:crypto';

const VOLUME_ID = /^vol-[0-9a-f]{16}$/;
const SNAPSHOT_ID = /^snap-[0-9a-f]{16}$/;
const GROUP_ID = /^group-[0-9a-f]{16}$/;

/** A new random volume ID. */
export function newVolumeId(): string {
  return `vol-${randomBytes(8).toString('hex')}`;
}

/** A new random snapshot ID. */
export function newSnapshotId(): string {
  return `snap-${randomBytes(8).toString('hex')}`;
}

/** Whether a string has the shape of a volume ID (it may still not exist). */
export function isVolumeId(id: unknown): id is string {
  return typeof id === 'string' && VOLUME_ID.test(id);
}

/** Whether a string has the shape of a snapshot ID (it may still not exist). */
export function isSnapshotId(id: unknown): id is string {
  return typeof id === 'string' && SNAPSHOT_ID.test(id);
}

/** A new random group snapshot ID. */
export function newGroupId(): string {
  return `group-${randomBytes(8).toString('hex')}`;
}

/** Whether a string has the shape of a group snapshot ID (it may still not exist). */
export function isGroupId(id: unknown): id is string {
  return typeof id === 'string' && GROUP_ID.test(id);
}
