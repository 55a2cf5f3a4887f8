/**
 * `meta.k8s.io` Table output for `kubectl get`, from the printer columns of a resource, and
 * PartialObjectMetadata for clients that only want metadata (garbage collector, namespace
 * controller, `kubectl get -o name`).
 */
import type { KubeObject, ResourceDefinition } from '../api/resources.ts';

export type IncludeObject = 'None' | 'Metadata' | 'Object';

/** k8s.io/apimachinery/pkg/util/duration.HumanDuration, as kubectl prints ages. */
export function humanDuration(ms: number): string {
  const seconds = Math.trunc(ms / 1000);
  if (seconds < -1) return '<invalid>';
  if (seconds < 0) return '0s';
  if (seconds < 120) return `${seconds}s`;
  const minutes = Math.trunc(seconds / 60);
  if (minutes < 10) {
    const s = seconds % 60;
    return s === 0 ? `${minutes}m` : `${minutes}m${s}s`;
  }
  if (minutes < 180) return `${minutes}m`;
  const hours = Math.trunc(minutes / 60);
  if (hours < 8) {
    const m = minutes % 60;
    return m === 0 ? `${hours}h` : `${hours}h${m}m`;
  }
  if (hours < 48) return `${hours}h`;
  if (hours < 24 * 8) {
    const h = hours % 24;
    return h === 0 ? `${Math.trunc(hours / 24)}d` : `${Math.trunc(hours / 24)}d${h}h`;
  }
  if (hours < 24 * 365 * 2) return `${Math.trunc(hours / 24)}d`;
  if (hours < 24 * 365 * 8) {
    const dy = Math.trunc(hours / 24) % 365;
    const y = Math.trunc(hours / 24 / 365);
    return dy === 0 ? `${y}y` : `${y}y${dy}d`;
  }
  return `${Math.trunc(hours / 24 / 365)}y`;
}

export function columnDefinitions(def: ResourceDefinition) {
  return [
    {
      name: 'Name',
      type: 'string',
      format: 'name',
      description: 'Name must be unique within a namespace. Cluster-scoped objects have unique names across the cluster.',
      priority: 0,
    },
    ...def.columns.map((c) => ({
      name: c.name,
      type: c.type === 'date' ? 'date' : c.type,
      format: c.format ?? '',
      description: c.description,
      priority: c.priority,
    })),
  ];
}

function cell(type: string, value: unknown, now: number): unknown {
  if (value === undefined || value === null) return null;
  if (type === 'date') {
    const t = Date.parse(String(value));
    return Number.isNaN(t) ? '<invalid>' : humanDuration(now - t);
  }
  return value;
}

export function partialObjectMetadata(obj: KubeObject, version: 'v1' | 'v1beta1') {
  return { kind: 'PartialObjectMetadata', apiVersion: `meta.k8s.io/${version}`, metadata: obj.metadata };
}

export function tableRow(def: ResourceDefinition, obj: KubeObject, include: IncludeObject, now: number) {
  const cells = [obj.metadata.name ?? '', ...def.columns.map((c) => cell(c.type, c.value(obj), now))];
  const row: { cells: unknown[]; object?: unknown } = { cells };
  if (include === 'Object') row.object = obj;
  else if (include === 'Metadata') row.object = partialObjectMetadata(obj, 'v1');
  return row;
}

export interface TableOptions {
  readonly version: 'v1' | 'v1beta1';
  readonly include: IncludeObject;
  readonly noHeaders: boolean;
  readonly now: number;
  readonly resourceVersion?: string;
  readonly continue?: string;
  readonly remainingItemCount?: number;
}

export function toTable(def: ResourceDefinition, objs: readonly KubeObject[], o: TableOptions) {
  return {
    kind: 'Table',
    apiVersion: `meta.k8s.io/${o.version}`,
    metadata: {
      ...(o.resourceVersion !== undefined ? { resourceVersion: o.resourceVersion } : {}),
      ...(o.continue ? { continue: o.continue } : {}),
      ...(o.remainingItemCount !== undefined ? { remainingItemCount: o.remainingItemCount } : {}),
    },
    columnDefinitions: o.noHeaders ? null : columnDefinitions(def),
    rows: objs.map((obj) => tableRow(def, obj, o.include, o.now)),
  };
}
