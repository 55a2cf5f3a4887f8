/**
 * Walks over JSON values guided by {@link TypeNode}s: the parts of structured-merge-diff's `typed`
 * package that server-side apply needs (`ToFieldSet`, `Compare`, `Merge`, and the pruning step of
 * `merge.Updater.Apply`).
 *
 * Values are never mutated. Results share unchanged subtrees with the inputs (copy-on-write), so a
 * comparison of a merged object with the live object it came from only descends into what changed.
 */
import { FieldSet, FieldSetBuilder, fieldPE, parsePE, pathToString, type JsonObject } from './field-set.ts';
import {
  FieldManagerError,
  fieldType,
  isDeclaredField,
  listItemPE,
  resolveType,
  type ListType,
  type MapType,
  type TypeNode,
} from './type-info.ts';

const hasOwn = Object.prototype.hasOwnProperty;

function isObj(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Own property value, treating `undefined` as absent. */
function own(o: JsonObject, k: string): unknown {
  return hasOwn.call(o, k) ? o[k] : undefined;
}

function setKey(o: JsonObject, k: string, v: unknown): void {
  if (k === '__proto__') Object.defineProperty(o, k, { value: v, enumerable: true, writable: true, configurable: true });
  else o[k] = v;
}

function copyObject(o: JsonObject): JsonObject {
  const out: JsonObject = {};
  for (const k of Object.keys(o)) setKey(out, k, o[k]);
  return out;
}

function isEmptyContainer(v: unknown): boolean {
  if (v === undefined || v === null) return true;
  if (Array.isArray(v)) return v.length === 0;
  if (isObj(v)) {
    for (const k in v) if (hasOwn.call(v, k) && v[k] !== undefined) return false;
    return true;
  }
  return false;
}

/** Structural equality of JSON values (key order ignored, `undefined` members ignored). */
export function deepEqual(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) {
    return typeof a === 'number' && typeof b === 'number' ? a === b : false;
  }
  if (Array.isArray(a)) {
    if (!Array.isArray(b) || a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (!deepEqual(a[i], b[i])) return false;
    return true;
  }
  if (Array.isArray(b)) return false;
  const ao = a as JsonObject;
  const bo = b as JsonObject;
  let na = 0;
  for (const k in ao) {
    if (!hasOwn.call(ao, k) || ao[k] === undefined) continue;
    na++;
    if (!deepEqual(ao[k], own(bo, k))) return false;
  }
  let nb = 0;
  for (const k in bo) if (hasOwn.call(bo, k) && bo[k] !== undefined) nb++;
  return na === nb;
}

/** True when `v` is present but not of the container kind `t` expects (it is then a leaf). */
function mismatched(t: MapType | ListType, v: unknown): boolean {
  if (v === undefined || v === null) return false;
  return t.kind === 'map' ? !isObj(v) : !Array.isArray(v);
}

function itemPE(t: ListType, item: unknown, index: number, stack: readonly string[]): string {
  try {
    return listItemPE(t, item, '', index);
  } catch (err) {
    if (err instanceof FieldManagerError) throw new FieldManagerError(pathToString(stack), err.message);
    throw err;
  }
}

/**
 * Largest number of differing / applied / previously applied items handled by the key-scan fast
 * paths (beyond it, every item of the list is keyed). Mutable for tests (-1 disables them).
 */
export const tuning = { fewItems: 8 };

/** The values identifying a list item (key fields in sorted order, or the value of a set item). */
function keyValues(t: ListType, item: unknown): unknown[] | undefined {
  if (t.rel === 'set') return [item];
  if (!isObj(item)) return undefined;
  const out: unknown[] = [];
  for (const k of t.sortedKeys) {
    const v = own(item, k);
    if (v !== undefined) out.push(v);
    else if (t.keyDefaults.has(k)) out.push(t.keyDefaults.get(k));
    else return undefined;
  }
  return out;
}

/** Whether `item` has the identifying values `key` (no allocation). */
function hasKey(t: ListType, item: unknown, key: readonly unknown[]): boolean {
  if (t.rel === 'set') return item === key[0] || deepEqual(item, key[0]);
  if (!isObj(item)) return false;
  const keys = t.sortedKeys;
  for (let i = 0; i < keys.length; i++) {
    const k = keys[i] as string;
    let v = own(item, k);
    if (v === undefined) {
      if (!t.keyDefaults.has(k)) return false;
      v = t.keyDefaults.get(k);
    }
    const w = key[i];
    if (v !== w && !deepEqual(v, w)) return false;
  }
  return true;
}

// -------------------------------------------------------------------------------------------------
// ToFieldSet

/**
 * The fields an applied configuration sets, as `TypedValue.ToFieldSet`: scalars and atomic values,
 * every list item, every key of a map that is not a declared field; struct fields only through what
 * they contain. Also rejects what `Merge` rejects for a right-hand side (duplicate list keys,
 * list items without their keys).
 */
export function toFieldSet(value: unknown, type: TypeNode): FieldSet {
  const b = new FieldSetBuilder();
  tfs(value, type, [], b);
  return b.build();
}

function tfs(v: unknown, t: TypeNode, stack: string[], b: FieldSetBuilder): void {
  const r = resolveType(t, v);
  if (r.kind === 'leaf') {
    b.insert(stack);
    return;
  }
  if (r.kind === 'map') {
    if (r.atomic || mismatched(r, v)) {
      b.insert(stack);
      return;
    }
    if (!isObj(v)) return;
    for (const k of Object.keys(v)) {
      const val = v[k];
      if (val === undefined) continue;
      stack.push(fieldPE(k));
      tfs(val, fieldType(r, k), stack, b);
      if (!isDeclaredField(r, k)) b.insert(stack);
      stack.pop();
    }
    return;
  }
  if (r.rel === 'atomic' || mismatched(r, v)) {
    b.insert(stack);
    return;
  }
  if (!Array.isArray(v)) return;
  const seen = new Set<string>();
  for (let i = 0; i < v.length; i++) {
    const item: unknown = v[i];
    const pe = itemPE(r, item, i, stack);
    if (seen.has(pe)) {
      stack.push(pe);
      const shown = pathToString(stack.slice(-1));
      stack.pop();
      throw new FieldManagerError(pathToString(stack), `duplicate entries for key ${shown}`);
    }
    seen.add(pe);
    stack.push(pe);
    tfs(item, r.elem, stack, b);
    b.insert(stack);
    stack.pop();
  }
}

// -------------------------------------------------------------------------------------------------
// Compare

export interface Comparison {
  readonly added: FieldSet;
  readonly modified: FieldSet;
  readonly removed: FieldSet;
}

/**
 * `TypedValue.Compare`: leaves that changed are Modified; anything only on the right is Added with
 * everything below it; anything only on the left is Removed with everything below it. Maps and lists
 * that are empty (or null) on both sides compare as leaves. List items with duplicated keys are
 * compared as a group, atomically.
 */
export function compare(lhs: unknown, rhs: unknown, type: TypeNode): Comparison {
  const c = { added: new FieldSetBuilder(), modified: new FieldSetBuilder(), removed: new FieldSetBuilder() };
  cmp(lhs, rhs, type, [], c);
  return { added: c.added.build(), modified: c.modified.build(), removed: c.removed.build() };
}

interface CompareState {
  added: FieldSetBuilder;
  modified: FieldSetBuilder;
  removed: FieldSetBuilder;
}

function cmp(l: unknown, r: unknown, t: TypeNode, stack: string[], c: CompareState): void {
  if (l === r) return;
  const leaf = () => {
    if (l === undefined) c.added.insert(stack);
    else if (r === undefined) c.removed.insert(stack);
    else if (!deepEqual(l, r)) c.modified.insert(stack);
  };
  const rt = resolveType(t, r !== undefined ? r : l);
  if (rt.kind === 'leaf' || mismatched(rt, l) || mismatched(rt, r)) return leaf();
  if (rt.kind === 'map') {
    if (rt.atomic) return leaf();
    const lm = isObj(l) ? l : undefined;
    const rm = isObj(r) ? r : undefined;
    if (isEmptyContainer(lm) && isEmptyContainer(rm)) return leaf();
    if (lm) {
      for (const k of Object.keys(lm)) {
        const lv = lm[k];
        if (lv === undefined) continue;
        const rv = rm ? own(rm, k) : undefined;
        if (lv === rv) continue;
        stack.push(fieldPE(k));
        cmp(lv, rv, fieldType(rt, k), stack, c);
        stack.pop();
      }
    }
    if (rm) {
      for (const k of Object.keys(rm)) {
        const rv = rm[k];
        if (rv === undefined || (lm && own(lm, k) !== undefined)) continue;
        stack.push(fieldPE(k));
        cmp(undefined, rv, fieldType(rt, k), stack, c);
        stack.pop();
      }
    }
  } else {
    if (rt.rel === 'atomic') return leaf();
    const la = Array.isArray(l) ? l : undefined;
    const ra = Array.isArray(r) ? r : undefined;
    if (isEmptyContainer(la) && isEmptyContainer(ra)) return leaf();
    let lItems = la ?? [];
    let rItems = ra ?? [];
    if (tuning.fewItems >= 0 && la && ra && la.length === ra.length) {
      // Items equal at the same position cannot change anything unless a differing item shares
      // their key: compare only the differing ones when they are few and share no key.
      const diff: number[] = [];
      for (let i = 0; i < la.length && diff.length <= tuning.fewItems; i++) if (la[i] !== ra[i] && !deepEqual(la[i], ra[i])) diff.push(i);
      if (diff.length === 0) return;
      if (diff.length <= tuning.fewItems) {
        const keys: unknown[][] = [];
        let usable = true;
        for (const i of diff) {
          const lk = keyValues(rt, la[i]);
          const rk = keyValues(rt, ra[i]);
          if (!lk || !rk) {
            usable = false;
            break;
          }
          keys.push(lk, rk);
        }
        if (usable) {
          const differing = new Set(diff);
          for (let j = 0; j < la.length && usable; j++) {
            if (differing.has(j)) continue;
            for (const k of keys) {
              if (hasKey(rt, la[j], k)) {
                usable = false;
                break;
              }
            }
          }
        }
        if (usable) {
          lItems = diff.map((i) => la[i]);
          rItems = diff.map((i) => ra[i]);
        }
      }
    }
    const order: string[] = [];
    const lv = new Map<string, unknown[]>();
    const rv = new Map<string, unknown[]>();
    for (let i = 0; i < lItems.length; i++) {
      const pe = itemPE(rt, lItems[i], i, stack);
      const g = lv.get(pe);
      if (g) g.push(lItems[i]);
      else {
        lv.set(pe, [lItems[i]]);
        order.push(pe);
      }
    }
    for (let i = 0; i < rItems.length; i++) {
      const pe = itemPE(rt, rItems[i], i, stack);
      const g = rv.get(pe);
      if (g) g.push(rItems[i]);
      else {
        rv.set(pe, [rItems[i]]);
        if (!lv.has(pe)) order.push(pe);
      }
    }
    const elem = rt.elem;
    for (const pe of order) {
      const lg = lv.get(pe) ?? [];
      const rg = rv.get(pe) ?? [];
      stack.push(pe);
      if (lg.length <= 1 && rg.length <= 1) {
        if (lg.length === 1 && rg.length === 1 && deepEqual(lg[0], rg[0])) {
          stack.pop();
          continue;
        }
        cmp(lg[0], rg[0], elem, stack, c);
      } else if (lg.length >= 2 && rg.length >= 2) {
        if (!deepEqual(lg, rg)) c.modified.insert(stack);
      } else if (lg.length >= 2) {
        // Duplicates before, not anymore: the new single item is added, the duplicate marker removed.
        if (rg.length !== 0) cmp(undefined, rg[0], elem, stack, c);
        c.removed.insert(stack);
      } else {
        if (lg.length !== 0) cmp(lg[0], undefined, elem, stack, c);
        c.added.insert(stack);
      }
      stack.pop();
    }
  }
  if (l === undefined) c.added.insert(stack);
  else if (r === undefined) c.removed.insert(stack);
}

// -------------------------------------------------------------------------------------------------
// Merge

/**
 * `TypedValue.Merge(config)` with the "right-hand side wins" rule: leaves and atomic values from the
 * configuration replace the live ones, structs and maps merge key by key, associative lists merge
 * item by item (structured-merge-diff's ordering: live order, with the configuration's items placed
 * in the configuration's order). Call {@link toFieldSet} on `rhs` first: it validates it.
 */
export function merge(lhs: unknown, rhs: unknown, type: TypeNode): unknown {
  return mrg(lhs, rhs, type, []);
}

const DUPLICATE: unique symbol = Symbol('duplicate');

function mrg(l: unknown, r: unknown, t: TypeNode, stack: string[]): unknown {
  if (r === undefined) return l;
  if (l === undefined) return r;
  const rt = resolveType(t, r);
  if (rt.kind === 'leaf') return r;
  if (r === null) {
    // A null map or list merges as an empty one: the live content stays.
    if (rt.kind === 'map' ? !rt.atomic && isObj(l) && !isEmptyContainer(l) : rt.rel !== 'atomic' && Array.isArray(l) && l.length > 0) return l;
    return null;
  }
  if (rt.kind === 'map') {
    if (rt.atomic || !isObj(r) || !isObj(l)) return r;
    if (isEmptyContainer(l) && isEmptyContainer(r)) return r;
    let out: JsonObject | undefined;
    for (const k of Object.keys(r)) {
      const rv = r[k];
      if (rv === undefined) continue;
      const lv = own(l, k);
      let v: unknown;
      if (lv === undefined) v = rv;
      else {
        stack.push(fieldPE(k));
        v = mrg(lv, rv, fieldType(rt, k), stack);
        stack.pop();
      }
      if (v !== lv) setKey((out ??= copyObject(l)), k, v);
    }
    return out ?? l;
  }
  if (rt.rel === 'atomic' || !Array.isArray(r) || !Array.isArray(l)) return r;
  if (l.length === 0 && r.length === 0) return r;
  return mergeList(l, r, rt, stack);
}

function mergeList(lhs: unknown[], rhs: unknown[], t: ListType, stack: string[]): unknown[] {
  const rPEs: string[] = [];
  const observedR = new Map<string, unknown>();
  for (let i = 0; i < rhs.length; i++) {
    const pe = itemPE(t, rhs[i], i, stack);
    rPEs.push(pe);
    observedR.set(pe, rhs[i]);
  }
  const lPEs: string[] = [];
  const observedL = new Map<string, unknown>();
  // With few configuration items only the live items sharing their keys matter: the others are
  // given a placeholder that matches nothing, instead of their key.
  const rKeys = rhs.length <= tuning.fewItems ? rhs.map((item) => keyValues(t, item)) : undefined;
  const scan = rKeys !== undefined && rKeys.every((k) => k !== undefined);
  for (let i = 0; i < lhs.length; i++) {
    let pe: string;
    if (scan) {
      const at = (rKeys as unknown[][]).findIndex((k) => hasKey(t, lhs[i], k));
      pe = at < 0 ? '\u0000' + i : (rPEs[at] as string);
    } else pe = itemPE(t, lhs[i], i, stack);
    lPEs.push(pe);
    observedL.set(pe, observedL.has(pe) ? DUPLICATE : lhs[i]);
  }
  const shared = rPEs.filter((pe) => observedL.has(pe));
  let sharedAt = 0;
  let nextShared: string | undefined = shared[sharedAt++];
  const mergedR = new Set<string>();
  const out: unknown[] = [];
  const item = (pe: string, l: unknown, r: unknown) => {
    stack.push(pe);
    const v = mrg(l === DUPLICATE ? undefined : l, r, t.elem, stack);
    stack.pop();
    if (v !== undefined) out.push(v);
  };
  let lI = 0;
  let rI = 0;
  while (lI < lPEs.length || rI < rPEs.length) {
    if (lI < lPEs.length && rI < rPEs.length) {
      const pe = lPEs[lI] as string;
      if (pe === rPEs[rI]) {
        mergedR.add(pe);
        item(pe, observedL.get(pe), observedR.get(pe));
        lI++;
        rI++;
        nextShared = shared[sharedAt++];
        continue;
      }
      if (observedR.has(pe) && nextShared !== undefined && nextShared !== pe) {
        // A shared item, but not the one wanted in this round.
        lI++;
        continue;
      }
    }
    if (lI < lPEs.length) {
      const pe = lPEs[lI] as string;
      if (!observedR.has(pe)) {
        item(pe, lhs[lI], undefined);
        lI++;
        continue;
      }
      if (mergedR.has(pe)) {
        lI++;
        continue;
      }
    }
    if (rI < rPEs.length) {
      const pe = rPEs[rI] as string;
      mergedR.add(pe);
      item(pe, observedL.get(pe), observedR.get(pe));
      rI++;
      if (nextShared === pe) nextShared = shared[sharedAt++];
    }
  }
  return out;
}

// -------------------------------------------------------------------------------------------------
// Prune

/**
 * The pruning step of `merge.Updater.Apply`: removes from `merged` every field, list item or map
 * key that the applier set last time (`last`) and no longer sets, unless a manager (any of `owned`,
 * which includes the applier's new set) owns it. A struct field counts as owned when anything below
 * it is owned (`EnsureNamedFieldsAreMembers`); a list item or map key only when owned itself.
 * Containers emptied by the removal stay (empty), as `RemoveItems` leaves them.
 */
export function prune(merged: unknown, type: TypeNode, last: FieldSet, owned: readonly FieldSet[]): unknown {
  return pruneWalk(merged, type, last, owned, true);
}

function pruneWalk(value: unknown, t: TypeNode, last: FieldSet, owned: readonly FieldSet[], root: boolean): unknown {
  const rt = resolveType(t, value);
  if (rt.kind === 'leaf') return value;
  if (rt.kind === 'map') {
    if (rt.atomic || !isObj(value)) return value;
    let out: JsonObject | undefined;
    for (const [pe, e] of last.entries()) {
      if (!pe.startsWith('f:')) continue;
      const name = pe.slice(2);
      const child = own(value, name);
      if (child === undefined) continue;
      const ft = fieldType(rt, name);
      const named = isDeclaredField(rt, name);
      const others = owned.flatMap((s) => {
        const n = s.get(pe);
        return n ? [n] : [];
      });
      const lastMember = e.member || (named && e.children !== undefined);
      const ownedMember = others.some((n) => n.member || (named && n.children !== undefined));
      // Never drop the whole metadata: identity fields are not tracked (stripped), yet required.
      if (lastMember && !ownedMember && !(root && name === 'metadata') && (!named || hasSetEntries(child, ft))) {
        out ??= copyObject(value);
        delete out[name];
        continue;
      }
      if (e.children) {
        const nc = pruneWalk(child, ft, e.children, others.flatMap((n) => (n.children ? [n.children] : [])), false);
        if (nc !== child) setKey((out ??= copyObject(value)), name, nc);
      }
    }
    return out ?? value;
  }
  if (rt.rel === 'atomic' || !Array.isArray(value)) return value;
  const index = new Map<string, number[]>();
  const add = (pe: string, i: number) => {
    const g = index.get(pe);
    if (g) g.push(i);
    else index.set(pe, [i]);
  };
  if (last.size <= tuning.fewItems) {
    // Find the few items `last` names by their key values rather than keying every item.
    const wanted: Array<[string, unknown[]]> = [];
    for (const [pe] of last.entries()) {
      const parsed = parsePE(pe);
      if (parsed.type === 'k' && rt.rel === 'map') {
        const byName = new Map(parsed.fields);
        if (rt.sortedKeys.length === parsed.fields.length && rt.sortedKeys.every((k) => byName.has(k))) wanted.push([pe, rt.sortedKeys.map((k) => byName.get(k))]);
      } else if (parsed.type === 'v' && rt.rel === 'set') wanted.push([pe, [parsed.value]]);
    }
    for (let i = 0; i < value.length; i++) for (const [pe, key] of wanted) if (hasKey(rt, value[i], key)) add(pe, i);
  } else {
    for (let i = 0; i < value.length; i++) add(listItemPE(rt, value[i], '', i), i);
  }
  const drop = new Set<number>();
  const replace = new Map<number, unknown>();
  for (const [pe, e] of last.entries()) {
    const idxs = index.get(pe);
    if (!idxs) continue;
    const others = owned.flatMap((s) => {
      const n = s.get(pe);
      return n ? [n] : [];
    });
    if (e.member && !others.some((n) => n.member)) {
      for (const i of idxs) drop.add(i);
      continue;
    }
    if (e.children) {
      const inner = others.flatMap((n) => (n.children ? [n.children] : []));
      for (const i of idxs) {
        const nc = pruneWalk(value[i], rt.elem, e.children, inner, false);
        if (nc !== value[i]) replace.set(i, nc);
      }
    }
  }
  if (drop.size === 0 && replace.size === 0) return value;
  const out: unknown[] = [];
  for (let i = 0; i < value.length; i++) {
    if (drop.has(i)) continue;
    out.push(replace.has(i) ? replace.get(i) : value[i]);
  }
  return out;
}

/** Whether `ToFieldSet` of the value yields anything (a named field is then part of the merged set). */
function hasSetEntries(v: unknown, t: TypeNode): boolean {
  if (v === undefined) return false;
  const r = resolveType(t, v);
  if (r.kind === 'leaf') return true;
  if (r.kind === 'map') {
    if (r.atomic || mismatched(r, v)) return true;
    if (!isObj(v)) return false;
    for (const k of Object.keys(v)) {
      const child = v[k];
      if (child === undefined) continue;
      if (!isDeclaredField(r, k) || hasSetEntries(child, fieldType(r, k))) return true;
    }
    return false;
  }
  if (r.rel === 'atomic' || mismatched(r, v)) return true;
  return Array.isArray(v) && v.length > 0;
}
