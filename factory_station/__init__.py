"""factory_station."""
