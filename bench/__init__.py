# SPDX-License-Identifier: Apache-2.0
"""xdplb's benchmarks (`make bench`): never run as tests."""
