"""The Kubernetes emulator's parts (lab/k8s_emulator.py is the server): the resource table, the workloads a
cluster derives from deployments (ReplicaSets, Pods, Endpoints, EndpointSlices, pod logs), the
HorizontalPodAutoscaler controller, and the server-side Tables ``kubectl get`` prints."""
