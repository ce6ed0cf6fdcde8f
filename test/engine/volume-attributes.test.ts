/**
 * updateVolumeAttributes: the engine keeps a volume's attributes as opaque strings; an update sets the keys
 * it names (others keep their values) in one catalog transaction, survives reopening, tells the host with a
 * `volume-attributes-changed` event, and is a silent no-op when nothing would change.
 */
import { describe, expect, test } from 'vitest';
import { InvalidArgumentError, NotFoundError, StoreClosedError } from '../../storage-engine/errors.js';
import type { StoreEvent } from '../../storage-engine/types.js';
import { MiB, useTempStores } from './support/example-support.js';

const stores = useTempStores();

describe('updateVolumeAttributes', () => {
  test('sets the keys given, keeps the others, and the change survives a reopen', async () => {
    const events: StoreEvent[] = [];
    const { store, dir } = stores.open({ onEvent: (e) => e.type === 'volume-attributes-changed' && events.push(e) });
    const vol = await store.createVolume({ capacityBytes: MiB, attributes: { a: '1', b: '2' } });
    const updated = await store.updateVolumeAttributes(vol.id, { b: '3', c: '4' });
    expect(updated.attributes).toEqual({ a: '1', b: '3', c: '4' });
    expect(store.getVolume(vol.id).attributes).toEqual({ a: '1', b: '3', c: '4' });
    expect(events).toEqual([{ type: 'volume-attributes-changed', volumeId: vol.id }]);
    await store.close();
    expect(stores.reopen(dir).getVolume(vol.id).attributes).toEqual({ a: '1', b: '3', c: '4' });
  });

  test('setting the values a volume already has changes nothing and emits nothing', async () => {
    const events: StoreEvent[] = [];
    const { store } = stores.open({ onEvent: (e) => e.type === 'volume-attributes-changed' && events.push(e) });
    const vol = await store.createVolume({ capacityBytes: MiB, attributes: { a: '1' } });
    expect((await store.updateVolumeAttributes(vol.id, { a: '1' })).attributes).toEqual({ a: '1' });
    expect((await store.updateVolumeAttributes(vol.id, {})).attributes).toEqual({ a: '1' });
    expect(events).toEqual([]);
  });

  test('an unknown volume is NOT_FOUND, non-string values INVALID_ARGUMENT, a closed store StoreClosedError; nothing changes', async () => {
    const { store } = stores.open();
    const vol = await store.createVolume({ capacityBytes: MiB, attributes: { a: '1' } });
    await expect(store.updateVolumeAttributes('vol-0000000000000000', { a: '2' })).rejects.toBeInstanceOf(
      NotFoundError,
    );
    await expect(
      store.updateVolumeAttributes(vol.id, { a: 2 } as unknown as Record<string, string>),
    ).rejects.toBeInstanceOf(InvalidArgumentError);
    expect(store.getVolume(vol.id).attributes).toEqual({ a: '1' });
    await store.close();
    await expect(store.updateVolumeAttributes(vol.id, { a: '2' })).rejects.toBeInstanceOf(StoreClosedError);
  });

  test('a volume created again by name after an update is the same volume only with its current attributes', async () => {
    const { store } = stores.open();
    const vol = await store.createVolume({ name: 'v', capacityBytes: MiB, attributes: { a: '1' } });
    await store.updateVolumeAttributes(vol.id, { a: '2' });
    expect((await store.createVolume({ name: 'v', capacityBytes: MiB, attributes: { a: '2' } })).id).toBe(vol.id);
    await expect(store.createVolume({ name: 'v', capacityBytes: MiB, attributes: { a: '1' } })).rejects.toThrow(
      /exists with different properties/,
    );
  });
});
