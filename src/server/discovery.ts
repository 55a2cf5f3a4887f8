/**
 * API discovery documents: the legacy per-level documents (`/apis`, `/apis/<group>`,
 * `/apis/<group>/<version>`) and aggregated discovery (`apidiscovery.k8s.io` v2 and v2beta1),
 * which kubectl and the aggregator ask for first.
 */
import type { ResourceDefinition } from '../api/resources.ts';

const RESOURCE_VERBS = ['create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'];
const STATUS_VERBS = ['get', 'patch', 'update'];

interface GroupVersions {
  readonly group: string;
  readonly version: string;
  readonly resources: readonly ResourceDefinition[];
}

export function groupVersionsOf(resources: readonly ResourceDefinition[]): GroupVersions[] {
  const out = new Map<string, GroupVersions>();
  for (const r of resources) {
    const k = `${r.group}/${r.version}`;
    const gv = out.get(k) ?? { group: r.group, version: r.version, resources: [] };
    out.set(k, { ...gv, resources: [...gv.resources, r] });
  }
  return [...out.values()];
}

export function apiGroupList(resources: readonly ResourceDefinition[]) {
  return {
    kind: 'APIGroupList',
    apiVersion: 'v1',
    groups: groupVersionsOf(resources).map((gv) => apiGroupBody(gv)),
  };
}

function apiGroupBody(gv: GroupVersions) {
  const v = { groupVersion: `${gv.group}/${gv.version}`, version: gv.version };
  return { name: gv.group, versions: [v], preferredVersion: v };
}

export function apiGroup(resources: readonly ResourceDefinition[], group: string) {
  const gv = groupVersionsOf(resources).find((g) => g.group === group);
  return gv ? { kind: 'APIGroup', apiVersion: 'v1', ...apiGroupBody(gv) } : undefined;
}

export function apiResourceList(resources: readonly ResourceDefinition[], group: string, version: string) {
  const gv = groupVersionsOf(resources).find((g) => g.group === group && g.version === version);
  if (!gv) return undefined;
  return {
    kind: 'APIResourceList',
    apiVersion: 'v1',
    groupVersion: `${group}/${version}`,
    resources: gv.resources.flatMap((r) => [
      {
        name: r.plural,
        singularName: r.singular,
        namespaced: false,
        kind: r.kind,
        verbs: RESOURCE_VERBS,
        shortNames: r.shortNames,
        categories: r.categories,
      },
      { name: `${r.plural}/status`, singularName: '', namespaced: false, kind: r.kind, verbs: STATUS_VERBS },
    ]),
  };
}

export function aggregatedDiscovery(resources: readonly ResourceDefinition[], version: 'v2' | 'v2beta1') {
  return {
    kind: 'APIGroupDiscoveryList',
    apiVersion: `apidiscovery.k8s.io/${version}`,
    metadata: {},
    items: groupVersionsOf(resources).map((gv) => ({
      metadata: { name: gv.group, creationTimestamp: null },
      versions: [
        {
          version: gv.version,
          freshness: 'Current',
          resources: gv.resources.map((r) => ({
            resource: r.plural,
            responseKind: { group: r.group, version: r.version, kind: r.kind },
            scope: 'Cluster',
            singularResource: r.singular,
            verbs: RESOURCE_VERBS,
            shortNames: r.shortNames,
            categories: r.categories,
            subresources: [
              {
                subresource: 'status',
                responseKind: { group: r.group, version: r.version, kind: r.kind },
                verbs: STATUS_VERBS,
              },
            ],
          })),
        },
      ],
    })),
  };
}

/** An extension server serves no core group; `/api` says so rather than 404. */
export function coreVersions() {
  return { kind: 'APIVersions', versions: [], serverAddressByClientCIDRs: [] };
}

export function emptyAggregatedDiscovery(version: 'v2' | 'v2beta1') {
  return { kind: 'APIGroupDiscoveryList', apiVersion: `apidiscovery.k8s.io/${version}`, metadata: {}, items: [] };
}
